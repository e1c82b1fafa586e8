package fse

import (
	"encoding/json"
	"fmt"
	"math"
	"strings"
)

// The JSON lines of docs/protocol.md, as `fse generate --json` and every client's
// guarded-generate print them: Token and Verdict marshal to one object each with the
// keys in the protocol's order, and Info (through the json tags of its types) to
// GetInfo's answer with the proto's field names, less the model's path. Doubles print
// in shortest round-trip form; NaN and the infinities, which JSON cannot hold, as null.

// number is a double that marshals as null when JSON cannot hold it.
type number float64

func (n number) MarshalJSON() ([]byte, error) {
	if f := float64(n); !math.IsNaN(f) && !math.IsInf(f, 0) {
		return json.Marshal(f)
	}
	return []byte("null"), nil
}

// optional is a *float64 as JSON: nil and the non-finite doubles are null.
func optional(p *float64) *number {
	if p == nil {
		return nil
	}
	n := number(*p)
	return &n
}

// orNull is an empty string as JSON null.
func orNull(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

type tripJSON struct {
	Guard     string  `json:"guard"`
	Value     *number `json:"value"`
	Threshold *number `json:"threshold"`
}

// MarshalJSON writes the token line: type, index, id, text, nll, ppl, variance,
// max_prob, l2_norm, entropy, health (null when unspecified), and warnings only when there
// are any.
func (t Token) MarshalJSON() ([]byte, error) {
	var health *string
	if t.Health != HealthUnspecified {
		health = new(t.Health.String())
	}
	var warnings []tripJSON
	for _, w := range t.Warnings {
		warnings = append(warnings, tripJSON{w.Guard, optional(w.Value), optional(w.Threshold)})
	}
	return json.Marshal(struct {
		Type     string     `json:"type"`
		Index    uint32     `json:"index"`
		ID       int32      `json:"id"`
		Text     string     `json:"text"`
		NLL      number     `json:"nll"`
		PPL      number     `json:"ppl"`
		Variance number     `json:"variance"`
		MaxProb  number     `json:"max_prob"`
		L2Norm   number     `json:"l2_norm"`
		Entropy  number     `json:"entropy"`
		Health   *string    `json:"health"`
		Warnings []tripJSON `json:"warnings,omitempty"`
	}{"token", t.Index, t.ID, t.Text, number(t.NLL), number(t.PPL), number(t.Variance),
		number(t.MaxProb), number(t.L2Norm), number(t.Entropy), health, warnings})
}

// MarshalJSON writes the verdict line: type, status, completion (null when unspecified),
// guard (null when empty), value, threshold, token_index (each null when unset), tokens,
// text, policy, policy_sha256, and message only when it is not empty.
func (v Verdict) MarshalJSON() ([]byte, error) {
	var completion *string
	if v.Completion != CompletionUnspecified {
		completion = new(v.Completion.String())
	}
	return json.Marshal(struct {
		Type         string  `json:"type"`
		Status       string  `json:"status"`
		Completion   *string `json:"completion"`
		Guard        *string `json:"guard"`
		Value        *number `json:"value"`
		Threshold    *number `json:"threshold"`
		TokenIndex   *uint32 `json:"token_index"`
		Tokens       uint32  `json:"tokens"`
		Text         string  `json:"text"`
		Policy       string  `json:"policy"`
		PolicySHA256 string  `json:"policy_sha256"`
		Message      string  `json:"message,omitempty"`
	}{"verdict", v.Status.String(), completion, orNull(v.Guard), optional(v.Value), optional(v.Threshold),
		v.TokenIndex, v.Tokens, v.Text, v.Policy, v.PolicySHA256, v.Message})
}

// String is the verdict as one line for people, e.g. "[completed at max_tokens] 12 tokens
// released · policy default (0123456789ab)" or "[halted by l2_norm: value 2574.2,
// threshold 10, at token 0] 0 tokens released · policy test (0123456789ab)": value and
// threshold as C's %.6g, "n/a" when unset; the policy's hash cut to 12 characters.
func (v Verdict) String() string {
	what := v.Status.String()
	if v.Status == StatusCompleted && v.Completion != CompletionUnspecified {
		what += " at " + v.Completion.String()
	}
	if v.Status == StatusHalted {
		at := "n/a"
		if v.TokenIndex != nil {
			at = fmt.Sprint(*v.TokenIndex)
		}
		what = fmt.Sprintf("halted by %s: value %s, threshold %s, at token %s",
			v.Guard, formatG6(v.Value), formatG6(v.Threshold), at)
	}
	if v.Message != "" {
		what += ": " + v.Message
	}
	return fmt.Sprintf("[%s] %d tokens released · policy %s (%.12s)", what, v.Tokens, v.Policy, v.PolicySHA256)
}

// formatG6 is C's %.6g ("n/a" when unset); Go's %g differs only in spelling NaN and infinities.
func formatG6(p *float64) string {
	if p == nil {
		return "n/a"
	}
	return strings.ToLower(strings.TrimPrefix(fmt.Sprintf("%.6g", *p), "+"))
}
