package fse

import (
	"bytes"
	"encoding/json"
	"math"
	"strconv"
	"strings"
	"testing"
)

// render is v as one JSON line, as guarded-generate writes it.
func render(t *testing.T, v any) string {
	t.Helper()
	var b bytes.Buffer
	if err := json.NewEncoder(&b).Encode(v); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

// keys returns the top-level keys of a JSON object in their order.
func keys(t *testing.T, line string) []string {
	t.Helper()
	dec := json.NewDecoder(strings.NewReader(line))
	if _, err := dec.Token(); err != nil {
		t.Fatal(err)
	}
	var out []string
	for dec.More() {
		k, err := dec.Token()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, k.(string))
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

func TestTokenJSON(t *testing.T) {
	tok := Token{
		Index: 0, ID: 15687, Text: " Berlin <&> 日本", NLL: 0.1 + 0.2, PPL: math.NaN(),
		Variance: math.Inf(1), MaxProb: 5e-324, L2Norm: 2574.2, Entropy: 1.2345678901234567,
		Health: HealthGreen,
	}
	line := render(t, tok)
	if !strings.HasSuffix(line, "}\n") || strings.Count(line, "\n") != 1 {
		t.Errorf("not one line: %q", line)
	}
	if got := strings.Join(keys(t, line), ","); got != "type,index,id,text,nll,ppl,variance,max_prob,l2_norm,entropy,health" {
		t.Errorf("keys %s", got)
	}
	var doc map[string]any
	if err := json.Unmarshal([]byte(line), &doc); err != nil {
		t.Fatal(err)
	}
	if doc["nll"] != 0.1+0.2 || doc["max_prob"] != 5e-324 || doc["l2_norm"] != 2574.2 ||
		doc["entropy"] != 1.2345678901234567 {
		t.Errorf("numbers do not round-trip: %s", line)
	}
	if doc["ppl"] != nil || doc["variance"] != nil || doc["health"] != "green" || doc["text"] != tok.Text {
		t.Errorf("doc %v", doc)
	}
	if !strings.Contains(line, "日本") {
		t.Errorf("text is escaped: %s", line)
	}

	tok.Health = HealthUnspecified
	v, th := 3.5, 3.0
	tok.Warnings = []GuardTrip{{Guard: "perplexity", Value: &v, Threshold: &th}, {Guard: "loop"}}
	line = render(t, tok)
	if !strings.Contains(line, `"health":null,"warnings":[{"guard":"perplexity","value":3.5,"threshold":3},{"guard":"loop","value":null,"threshold":null}]`) {
		t.Errorf("warnings/health: %s", line)
	}
}

func TestNumbersAreShortestRoundTrip(t *testing.T) {
	for _, f := range []float64{0.17, 1.6706802200728248, 1e21, 1e-7, 123456789.125, -0.5, 0, math.MaxFloat64} {
		out, err := number(f).MarshalJSON()
		if err != nil {
			t.Fatal(err)
		}
		back, err := strconv.ParseFloat(string(out), 64)
		// Shortest digits: never longer than strconv's shortest exponent form.
		if err != nil || back != f || len(out) > len(strconv.FormatFloat(f, 'e', -1, 64)) {
			t.Errorf("%v -> %s", f, out)
		}
	}
}

func TestVerdictJSON(t *testing.T) {
	value, threshold, at := 2574.2, 10.0, uint32(0)
	halted := Verdict{
		Status: StatusHalted, Guard: "l2_norm", Value: &value, Threshold: &threshold,
		TokenIndex: &at, Policy: "test", PolicySHA256: "abc",
	}
	want := `{"type":"verdict","status":"halted","completion":null,"guard":"l2_norm","value":2574.2,"threshold":10,"token_index":0,"tokens":0,"text":"","policy":"test","policy_sha256":"abc"}` + "\n"
	if got := render(t, halted); got != want {
		t.Errorf("got  %s want %s", got, want)
	}
	errored := Verdict{Status: StatusError, Tokens: 3, Text: "abc", Message: "boom"}
	want = `{"type":"verdict","status":"error","completion":null,"guard":null,"value":null,"threshold":null,"token_index":null,"tokens":3,"text":"abc","policy":"","policy_sha256":"","message":"boom"}` + "\n"
	if got := render(t, errored); got != want {
		t.Errorf("got  %s want %s", got, want)
	}
	for c, name := range map[Completion]string{
		CompletionEndOfGeneration: "end_of_generation", CompletionStopSequence: "stop_sequence",
		CompletionMaxTokens: "max_tokens",
	} {
		completed := Verdict{Status: StatusCompleted, Completion: c, Tokens: 2, Text: "ab", Policy: "default", PolicySHA256: "abc"}
		want = `{"type":"verdict","status":"completed","completion":"` + name + `","guard":null,"value":null,"threshold":null,"token_index":null,"tokens":2,"text":"ab","policy":"default","policy_sha256":"abc"}` + "\n"
		if got := render(t, completed); got != want {
			t.Errorf("got  %s want %s", got, want)
		}
	}
}

func TestVerdictLine(t *testing.T) {
	value, threshold, at := 2574.2, 10.0, uint32(0)
	sha := "0123456789abcdef"
	for _, tc := range []struct {
		v    Verdict
		want string
	}{
		{Verdict{Status: StatusCompleted, Tokens: 12, Policy: "default", PolicySHA256: sha},
			"[completed] 12 tokens released · policy default (0123456789ab)"},
		{Verdict{Status: StatusCompleted, Completion: CompletionMaxTokens, Tokens: 12, Policy: "default", PolicySHA256: sha},
			"[completed at max_tokens] 12 tokens released · policy default (0123456789ab)"},
		{Verdict{Status: StatusCompleted, Completion: CompletionStopSequence, Tokens: 1, Policy: "default", PolicySHA256: sha},
			"[completed at stop_sequence] 1 tokens released · policy default (0123456789ab)"},
		{Verdict{Status: StatusHalted, Guard: "l2_norm", Value: &value, Threshold: &threshold,
			TokenIndex: &at, Policy: "test", PolicySHA256: sha},
			"[halted by l2_norm: value 2574.2, threshold 10, at token 0] 0 tokens released · policy test (0123456789ab)"},
		{Verdict{Status: StatusHalted, Guard: "shutdown", Policy: "test", PolicySHA256: sha},
			"[halted by shutdown: value n/a, threshold n/a, at token n/a] 0 tokens released · policy test (0123456789ab)"},
		{Verdict{Status: StatusError, Tokens: 3, Message: "MESSAGE", Policy: "default", PolicySHA256: sha},
			"[error: MESSAGE] 3 tokens released · policy default (0123456789ab)"},
		{Verdict{Status: StatusCancelled, Tokens: 2, Policy: "default"},
			"[cancelled] 2 tokens released · policy default ()"},
	} {
		if got := tc.v.String(); got != tc.want {
			t.Errorf("got  %s\nwant %s", got, tc.want)
		}
	}
}

func TestFormatG6(t *testing.T) {
	for f, want := range map[float64]string{
		0.331084: "0.331084", 2574.2: "2574.2", 10: "10", 1e6: "1e+06", 123456789: "1.23457e+08",
		1e-5: "1e-05", 0.0001: "0.0001", math.Inf(1): "inf", math.Inf(-1): "-inf", math.NaN(): "nan",
	} {
		if got := formatG6(&f); got != want {
			t.Errorf("formatG6(%v) = %s, want %s", f, got, want)
		}
	}
	if formatG6(nil) != "n/a" {
		t.Error("unset")
	}
}

func TestInfoJSONLeavesOutThePath(t *testing.T) {
	// As the wire gives it: Policies is never nil.
	info := &Info{Version: "0.1.0", Model: ModelInfo{Name: "m", Path: "/secret/m.gguf", SizeBytes: 253113024,
		Devices: []Device{}}, Policies: []PolicyInfo{}}
	line := render(t, info)
	if strings.Contains(line, "path") || strings.Join(keys(t, line), ",") != "version,model,policies,limits" {
		t.Errorf("info: %s", line)
	}
	if !strings.Contains(line, `"policies":[]`) || !strings.Contains(line, `"size_bytes":253113024,"chat_template":false,`) ||
		!strings.Contains(line, `"backend":"","layers":0,"gpu_layers":0,"devices":[]}`) {
		t.Errorf("info: %s", line)
	}
}
