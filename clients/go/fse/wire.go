package fse

import (
	"math"
	"time"

	"google.golang.org/grpc/codes"

	pb "libfse/clients/go/internal/pb/fse/v1"
)

// timeoutMillis is Request.Timeout on the wire: whole milliseconds, rounded half to
// even (as Python's round, so every client sends the same number), at least 1.
func timeoutMillis(d time.Duration) (uint32, error) {
	if d < 0 {
		return 0, &Error{Code: codes.InvalidArgument, Message: "timeout_ms: must not be negative"}
	}
	if d == 0 {
		return 0, nil
	}
	ms := math.RoundToEven(float64(d) / float64(time.Millisecond))
	if ms > math.MaxUint32 {
		return 0, &Error{Code: codes.InvalidArgument, Message: "timeout_ms: at most 4294967295 ms"}
	}
	return uint32(max(1, ms)), nil
}

func requestToWire(r Request) (*pb.GenerateClientMessage, error) {
	timeout, err := timeoutMillis(r.Timeout)
	if err != nil {
		return nil, err
	}
	start := &pb.GenerateRequest{
		Prompt:    r.Prompt,
		MaxTokens: r.MaxTokens,
		Sampling: &pb.Sampling{
			Temperature: r.Sampling.Temperature,
			TopK:        r.Sampling.TopK,
			TopP:        r.Sampling.TopP,
			MinP:        r.Sampling.MinP,
			Seed:        r.Sampling.Seed,
		},
		Policy:    r.Policy,
		Stop:      r.Stop,
		RequestId: r.RequestID,
		TimeoutMs: timeout,
	}
	for _, m := range r.Messages {
		start.Messages = append(start.Messages, &pb.ChatMessage{Role: m.Role, Content: m.Content})
	}
	return &pb.GenerateClientMessage{Kind: &pb.GenerateClientMessage_Start{Start: start}}, nil
}

func startedFromWire(s *pb.Started) Started {
	return Started{
		RequestID:    s.GetRequestId(),
		Policy:       s.GetPolicy(),
		PolicySHA256: s.GetPolicySha256(),
		PromptTokens: s.GetPromptTokens(),
		Seed:         s.GetSeed(),
		Model:        s.GetModel(),
	}
}

func healthFromWire(h pb.Health) Health {
	switch h {
	case pb.Health_HEALTH_GREEN:
		return HealthGreen
	case pb.Health_HEALTH_YELLOW:
		return HealthYellow
	case pb.Health_HEALTH_RED:
		return HealthRed
	}
	return HealthUnspecified
}

func tokenFromWire(t *pb.Token) Token {
	tok := Token{
		Index:         t.GetIndex(),
		ID:            t.GetId(),
		Piece:         t.GetPiece(),
		Text:          t.GetText(),
		NLL:           t.GetNll(),
		PPL:           t.GetPpl(),
		PPLCumulative: t.GetPplCumulative(),
		Variance:      t.GetVariance(),
		MaxProb:       t.GetMaxProb(),
		L2Norm:        t.GetL2Norm(),
		Entropy:       t.GetEntropy(),
		Health:        healthFromWire(t.GetHealth()),
	}
	for _, w := range t.GetWarnings() {
		tok.Warnings = append(tok.Warnings, GuardTrip{
			Guard: w.GetGuard(), Value: w.Value, Threshold: w.Threshold,
		})
	}
	return tok
}

// statusFromWire fails closed: anything but the three known outcomes is an error.
func statusFromWire(s pb.Status) Status {
	switch s {
	case pb.Status_STATUS_COMPLETED:
		return StatusCompleted
	case pb.Status_STATUS_HALTED:
		return StatusHalted
	case pb.Status_STATUS_CANCELLED:
		return StatusCancelled
	}
	return StatusError
}

// completionFromWire: an unknown reason is unspecified.
func completionFromWire(c pb.Completion) Completion {
	switch c {
	case pb.Completion_COMPLETION_END_OF_GENERATION:
		return CompletionEndOfGeneration
	case pb.Completion_COMPLETION_STOP_SEQUENCE:
		return CompletionStopSequence
	case pb.Completion_COMPLETION_MAX_TOKENS:
		return CompletionMaxTokens
	}
	return CompletionUnspecified
}

func verdictFromWire(v *pb.Verdict) Verdict {
	return Verdict{
		Status:       statusFromWire(v.GetStatus()),
		Completion:   completionFromWire(v.GetCompletion()),
		Guard:        v.GetGuard(),
		Value:        v.Value,
		Threshold:    v.Threshold,
		TokenIndex:   v.TokenIndex,
		Tokens:       v.GetTokens(),
		Text:         v.GetText(),
		Policy:       v.GetPolicy(),
		PolicySHA256: v.GetPolicySha256(),
		Message:      v.GetMessage(),
	}
}

func infoFromWire(i *pb.Info) *Info {
	m, l := i.GetModel(), i.GetLimits()
	info := &Info{
		Version: i.GetVersion(),
		Model: ModelInfo{
			Name:             m.GetName(),
			Path:             m.GetPath(),
			SHA256:           m.GetSha256(),
			Description:      m.GetDescription(),
			VocabSize:        m.GetVocabSize(),
			ContextSize:      m.GetContextSize(),
			TrainContextSize: m.GetTrainContextSize(),
			SizeBytes:        m.GetSizeBytes(),
			ChatTemplate:     m.GetChatTemplate(),
			Backend:          m.GetBackend(),
			Layers:           m.GetLayers(),
			GPULayers:        m.GetGpuLayers(),
			Devices:          []Device{},
		},
		Policies: []PolicyInfo{},
		Limits: Limits{
			MaxStreams:      l.GetMaxStreams(),
			MaxQueue:        l.GetMaxQueue(),
			MaxTokens:       l.GetMaxTokens(),
			MaxPromptTokens: l.GetMaxPromptTokens(),
			MaxMessageBytes: l.GetMaxMessageBytes(),
		},
	}
	for _, d := range m.GetDevices() {
		info.Model.Devices = append(info.Model.Devices, Device{
			Name: d.GetName(), Description: d.GetDescription(), Kind: d.GetKind(),
			MemoryBytes: d.GetMemoryBytes(), Layers: d.GetLayers(),
		})
	}
	for _, p := range i.GetPolicies() {
		info.Policies = append(info.Policies, PolicyInfo{
			Name: p.GetName(), SHA256: p.GetSha256(), Builtin: p.GetBuiltin(),
		})
	}
	return info
}
