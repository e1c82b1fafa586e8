package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"strings"

	"libfse/clients/go/fse"
)

// object is a JSON object with its keys in the order given: key, value, key, value...
// Doubles print in shortest round-trip form (encoding/json's); NaN and the infinities,
// which JSON cannot hold, as null.
type object []any

func (o object) MarshalJSON() ([]byte, error) {
	b := []byte{'{'}
	for i := 0; i+1 < len(o); i += 2 {
		k, _ := json.Marshal(o[i])
		v, err := encode(o[i+1])
		if err != nil {
			return nil, err
		}
		if i > 0 {
			b = append(b, ',')
		}
		b = append(append(append(b, k...), ':'), v...)
	}
	return append(b, '}'), nil
}

func encode(v any) ([]byte, error) {
	if p, ok := v.(*float64); ok && p != nil {
		v = *p
	}
	if f, ok := v.(float64); ok && (math.IsNaN(f) || math.IsInf(f, 0)) {
		return []byte("null"), nil
	}
	return json.Marshal(v)
}

// writeJSON writes one JSON line.
func writeJSON(w io.Writer, doc object) error {
	line, err := json.Marshal(doc)
	if err == nil {
		_, err = w.Write(append(line, '\n'))
	}
	return err
}

func orNull(s string) any {
	if s == "" {
		return nil
	}
	return s
}

func tokenDoc(t fse.Token) object {
	var health any
	if t.Health != fse.HealthUnspecified {
		health = t.Health.String()
	}
	doc := object{"type", "token", "index", t.Index, "id", t.ID, "text", t.Text, "nll", t.NLL,
		"ppl", t.PPL, "variance", t.Variance, "max_prob", t.MaxProb, "l2_norm", t.L2Norm, "health", health}
	if len(t.Warnings) > 0 {
		var trips []object
		for _, w := range t.Warnings {
			trips = append(trips, object{"guard", w.Guard, "value", w.Value, "threshold", w.Threshold})
		}
		doc = append(doc, "warnings", trips)
	}
	return doc
}

func verdictDoc(v fse.Verdict) object {
	doc := object{"type", "verdict", "status", v.Status.String(), "guard", orNull(v.Guard),
		"value", v.Value, "threshold", v.Threshold, "token_index", v.TokenIndex, "tokens", v.Tokens,
		"text", v.Text, "policy", v.Policy, "policy_sha256", v.PolicySHA256}
	if v.Message != "" {
		doc = append(doc, "message", v.Message)
	}
	return doc
}

// infoDoc is Info with the proto's field names, less model.path (the daemon machine's business).
func infoDoc(i *fse.Info) object {
	m, l := i.Model, i.Limits
	policies := []object{}
	for _, p := range i.Policies {
		policies = append(policies, object{"name", p.Name, "sha256", p.SHA256, "builtin", p.Builtin})
	}
	return object{"version", i.Version,
		"model", object{"name", m.Name, "sha256", m.SHA256, "description", m.Description,
			"vocab_size", m.VocabSize, "context_size", m.ContextSize, "train_context_size", m.TrainContextSize,
			"size_bytes", m.SizeBytes, "chat_template", m.ChatTemplate},
		"policies", policies,
		"limits", object{"max_streams", l.MaxStreams, "max_queue", l.MaxQueue, "max_tokens", l.MaxTokens,
			"max_prompt_tokens", l.MaxPromptTokens, "max_message_bytes", l.MaxMessageBytes}}
}

var colours = map[fse.Health]string{
	fse.HealthGreen: "\x1b[32m", fse.HealthYellow: "\x1b[33m", fse.HealthRed: "\x1b[31m",
}

// verdictLine is the one-line verdict of text mode, e.g.
// "[halted by l2_norm: value 2574.2, threshold 10, at token 0] 0 tokens released · policy test (0123456789ab)".
func verdictLine(v fse.Verdict) string {
	what := v.Status.String()
	if v.Status == fse.StatusHalted {
		at := "n/a"
		if v.TokenIndex != nil {
			at = fmt.Sprint(*v.TokenIndex)
		}
		what = fmt.Sprintf("halted by %s: value %s, threshold %s, at token %s",
			v.Guard, cG(v.Value), cG(v.Threshold), at)
	}
	if v.Message != "" {
		what += ": " + v.Message
	}
	return fmt.Sprintf("[%s] %d tokens released · policy %s (%.12s)", what, v.Tokens, v.Policy, v.PolicySHA256)
}

// cG is C's %.6g ("n/a" when unset); Go's %g differs only in spelling NaN and infinities.
func cG(p *float64) string {
	if p == nil {
		return "n/a"
	}
	return strings.ToLower(strings.TrimPrefix(fmt.Sprintf("%.6g", *p), "+"))
}
