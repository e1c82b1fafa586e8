package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"strconv"

	"libfse/clients/go/fse"
)

// num is a received double in JSON: shortest round-trip form (encoding/json's),
// null for NaN and the infinities, which JSON cannot hold.
type num float64

func (n num) MarshalJSON() ([]byte, error) {
	f := float64(n)
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return []byte("null"), nil
	}
	return json.Marshal(f)
}

func optNum(p *float64) *num {
	if p == nil {
		return nil
	}
	n := num(*p)
	return &n
}

func optString(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

// The JSON lines of the contract; struct order is key order.
type tokenJSON struct {
	Type     string     `json:"type"`
	Index    uint32     `json:"index"`
	ID       int32      `json:"id"`
	Text     string     `json:"text"`
	NLL      num        `json:"nll"`
	PPL      num        `json:"ppl"`
	Variance num        `json:"variance"`
	MaxProb  num        `json:"max_prob"`
	L2Norm   num        `json:"l2_norm"`
	Health   *string    `json:"health"`
	Warnings []tripJSON `json:"warnings,omitempty"`
}

type tripJSON struct {
	Guard     string `json:"guard"`
	Value     *num   `json:"value"`
	Threshold *num   `json:"threshold"`
}

type verdictJSON struct {
	Type         string  `json:"type"`
	Status       string  `json:"status"`
	Guard        *string `json:"guard"`
	Value        *num    `json:"value"`
	Threshold    *num    `json:"threshold"`
	TokenIndex   *uint32 `json:"token_index"`
	Tokens       uint32  `json:"tokens"`
	Text         string  `json:"text"`
	Policy       string  `json:"policy"`
	PolicySHA256 string  `json:"policy_sha256"`
	Message      string  `json:"message,omitempty"`
}

func tokenDoc(t fse.Token) tokenJSON {
	doc := tokenJSON{
		Type: "token", Index: t.Index, ID: t.ID, Text: t.Text,
		NLL: num(t.NLL), PPL: num(t.PPL), Variance: num(t.Variance),
		MaxProb: num(t.MaxProb), L2Norm: num(t.L2Norm),
	}
	if t.Health != fse.HealthUnspecified {
		doc.Health = optString(t.Health.String())
	}
	for _, w := range t.Warnings {
		doc.Warnings = append(doc.Warnings, tripJSON{w.Guard, optNum(w.Value), optNum(w.Threshold)})
	}
	return doc
}

func verdictDoc(v fse.Verdict) verdictJSON {
	return verdictJSON{
		Type: "verdict", Status: v.Status.String(), Guard: optString(v.Guard),
		Value: optNum(v.Value), Threshold: optNum(v.Threshold), TokenIndex: v.TokenIndex,
		Tokens: v.Tokens, Text: v.Text, Policy: v.Policy, PolicySHA256: v.PolicySHA256,
		Message: v.Message,
	}
}

type infoJSON struct {
	Version string `json:"version"`
	Model   struct {
		Name             string `json:"name"`
		SHA256           string `json:"sha256"`
		Description      string `json:"description"`
		VocabSize        uint32 `json:"vocab_size"`
		ContextSize      uint32 `json:"context_size"`
		TrainContextSize uint32 `json:"train_context_size"`
		SizeBytes        uint64 `json:"size_bytes"`
		ChatTemplate     bool   `json:"chat_template"`
	} `json:"model"`
	Policies []policyJSON `json:"policies"`
	Limits   struct {
		MaxStreams      uint32 `json:"max_streams"`
		MaxQueue        uint32 `json:"max_queue"`
		MaxTokens       uint32 `json:"max_tokens"`
		MaxPromptTokens uint32 `json:"max_prompt_tokens"`
		MaxMessageBytes uint32 `json:"max_message_bytes"`
	} `json:"limits"`
}

type policyJSON struct {
	Name    string `json:"name"`
	SHA256  string `json:"sha256"`
	Builtin bool   `json:"builtin"`
}

// infoDoc is Info without model.path, which is the daemon machine's business.
func infoDoc(i *fse.Info) infoJSON {
	var doc infoJSON
	m := i.Model
	doc.Version = i.Version
	doc.Model.Name, doc.Model.SHA256, doc.Model.Description = m.Name, m.SHA256, m.Description
	doc.Model.VocabSize, doc.Model.ContextSize = m.VocabSize, m.ContextSize
	doc.Model.TrainContextSize, doc.Model.SizeBytes = m.TrainContextSize, m.SizeBytes
	doc.Model.ChatTemplate = m.ChatTemplate
	doc.Policies = []policyJSON{}
	for _, p := range i.Policies {
		doc.Policies = append(doc.Policies, policyJSON(p))
	}
	l := i.Limits
	doc.Limits.MaxStreams, doc.Limits.MaxQueue, doc.Limits.MaxTokens = l.MaxStreams, l.MaxQueue, l.MaxTokens
	doc.Limits.MaxPromptTokens, doc.Limits.MaxMessageBytes = l.MaxPromptTokens, l.MaxMessageBytes
	return doc
}

// writeJSON writes one JSON line; text stays raw UTF-8 (no HTML escapes).
func writeJSON(w io.Writer, doc any) error {
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	return enc.Encode(doc)
}

// renderer shows a stream: JSON lines on stdout, or text on stdout and the
// verdict line on stderr.
type renderer interface {
	token(fse.Token) error
	verdict(fse.Verdict) error
}

type jsonRenderer struct{ out io.Writer }

func (r jsonRenderer) token(t fse.Token) error     { return writeJSON(r.out, tokenDoc(t)) }
func (r jsonRenderer) verdict(v fse.Verdict) error { return writeJSON(r.out, verdictDoc(v)) }

type textRenderer struct {
	out, err io.Writer
	colour   bool
}

var colours = map[fse.Health]string{
	fse.HealthGreen: "\x1b[32m", fse.HealthYellow: "\x1b[33m", fse.HealthRed: "\x1b[31m",
}

func (r textRenderer) token(t fse.Token) error {
	text := t.Text
	if c, ok := colours[t.Health]; ok && r.colour {
		text = c + text + "\x1b[0m"
	}
	_, err := io.WriteString(r.out, text)
	return err
}

func (r textRenderer) verdict(v fse.Verdict) error {
	if _, err := io.WriteString(r.out, "\n"); err != nil {
		return err
	}
	_, err := fmt.Fprintln(r.err, verdictLine(v))
	return err
}

// verdictLine is the one-line verdict of text mode, e.g.
// "[halted by l2_norm: value 2574.2, threshold 10, at token 0] 0 tokens released · policy test (0123456789ab)".
func verdictLine(v fse.Verdict) string {
	what := v.Status.String()
	if v.Status == fse.StatusHalted {
		at := "n/a"
		if v.TokenIndex != nil {
			at = strconv.FormatUint(uint64(*v.TokenIndex), 10)
		}
		what = fmt.Sprintf("halted by %s: value %s, threshold %s, at token %s",
			v.Guard, cG(v.Value), cG(v.Threshold), at)
	}
	if v.Message != "" {
		what += ": " + v.Message
	}
	hash := v.PolicySHA256
	if len(hash) > 12 {
		hash = hash[:12]
	}
	return fmt.Sprintf("[%s] %d tokens released · policy %s (%s)", what, v.Tokens, v.Policy, hash)
}

// cG is C's %.6g ("n/a" when unset); Go's %g differs only in NaN and infinities.
func cG(p *float64) string {
	switch {
	case p == nil:
		return "n/a"
	case math.IsNaN(*p):
		return "nan"
	case math.IsInf(*p, 1):
		return "inf"
	case math.IsInf(*p, -1):
		return "-inf"
	}
	return fmt.Sprintf("%.6g", *p)
}
