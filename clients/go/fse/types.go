package fse

import "time"

// Request is one generation. Exactly one of Prompt and Messages must be set; the
// daemon judges every value and answers an [Error] with code InvalidArgument that
// names the field when one is out of range.
type Request struct {
	// Prompt is raw text, tokenized with the model's BOS rule.
	Prompt string
	// Messages are rendered with the model's own chat template, ending at the
	// assistant's turn (see ModelInfo.ChatTemplate).
	Messages []ChatMessage
	// MaxTokens is the number of tokens to generate at most, 1..Limits.MaxTokens.
	MaxTokens uint32
	// Sampling: nil fields take llama.cpp's CLI defaults.
	Sampling Sampling
	// Policy is a name from Info.Policies; empty means "default".
	Policy string
	// Stop sequences: the first one generated ends the stream completed, and
	// neither it nor anything after it is released.
	Stop []string
	// RequestID is echoed in Started and the daemon's audit log.
	RequestID string
	// Timeout is the generation budget from admission (0 = none). When it passes
	// the stream halts with guard "deadline" and the verdict still arrives, unlike
	// a context deadline, which ends the RPC itself.
	Timeout time.Duration
}

// ChatMessage is one turn of a chat prompt.
type ChatMessage struct {
	Role    string // e.g. "system", "user", "assistant"
	Content string
}

// Sampling holds the sampling parameters; a nil field is left to the daemon's
// default (shown in brackets). Set one with new: Temperature: new(0.0) is greedy.
type Sampling struct {
	Temperature *float64 // >= 0; 0 = greedy (0.8)
	TopK        *int32   // >= 0; 0 = off (40)
	TopP        *float64 // 0 < top_p <= 1; 1 = off (0.95)
	MinP        *float64 // 0..1; 0 = off (0.05)
	Seed        *uint32  // nil = random, chosen by the daemon and reported in Started
}

// Started is the daemon's first message: the request was admitted.
type Started struct {
	RequestID    string
	Policy       string // the resolved policy name
	PolicySHA256 string // sha256 of the policy's canonical form
	PromptTokens uint32
	Seed         uint32 // the sampling seed in use (0 when greedy)
	Model        string
}

// Health is the windowed-perplexity band of a token.
type Health int

// The health bands; HealthUnspecified is what an older or faulty daemon sends.
const (
	HealthUnspecified Health = iota
	HealthGreen              // below the policy's green band
	HealthYellow             // between the bands: drifting or creative
	HealthRed                // above the red band
)

// String returns "green", "yellow", "red", or "unspecified".
func (h Health) String() string {
	switch h {
	case HealthGreen:
		return "green"
	case HealthYellow:
		return "yellow"
	case HealthRed:
		return "red"
	}
	return "unspecified"
}

// Token is one released token: every halting guard of the policy passed it.
type Token struct {
	Index uint32 // 0-based position among the generated tokens
	ID    int32  // token id in the model's vocabulary
	// Piece is the token's raw bytes; it can end inside a UTF-8 character.
	Piece []byte
	// Text holds complete characters only (an unfinished character is carried to
	// the next token), so the concatenated Text of all tokens is the output.
	Text          string
	NLL           float64 // -ln p(token) under the raw distribution, nats
	PPL           float64 // perplexity over the policy's window
	PPLCumulative float64 // perplexity over all generated tokens
	Variance      float64 // variance of the logits
	MaxProb       float64 // probability of the most likely token, 0..1
	L2Norm        float64 // L2 norm of the logit vector
	Entropy       float64 // entropy of the raw next-token distribution, nats
	Health        Health
	Warnings      []GuardTrip // guards with action "warn" that tripped here
}

// GuardTrip is a guard that tripped on a token without halting the stream.
type GuardTrip struct {
	Guard     string
	Value     *float64 // nil when the guard measured none
	Threshold *float64
}

// Status is how a stream ended.
type Status int

// The statuses of a [Verdict]. A status the daemon did not send, or one this
// package does not know, is StatusError: never StatusCompleted.
const (
	StatusError     Status = iota // internal failure (the RPC then fails with Internal)
	StatusCompleted               // max_tokens, end of generation or a stop sequence
	StatusHalted                  // a guard, the deadline or a shutdown stopped it
	StatusCancelled               // the client cancelled
)

// String returns "completed", "halted", "cancelled" or "error".
func (s Status) String() string {
	switch s {
	case StatusCompleted:
		return "completed"
	case StatusHalted:
		return "halted"
	case StatusCancelled:
		return "cancelled"
	}
	return "error"
}

// Completion is why a completed stream ended.
type Completion int

// The reasons of a completed [Verdict]; CompletionUnspecified for any other status, from
// a daemon that predates the field, and for a reason this package does not know.
const (
	CompletionUnspecified     Completion = iota
	CompletionEndOfGeneration            // the model ended its output
	CompletionStopSequence               // a stop sequence of the request was generated
	CompletionMaxTokens                  // max_tokens were generated
)

// String returns "end_of_generation", "stop_sequence", "max_tokens", or "unspecified".
func (c Completion) String() string {
	switch c {
	case CompletionEndOfGeneration:
		return "end_of_generation"
	case CompletionStopSequence:
		return "stop_sequence"
	case CompletionMaxTokens:
		return "max_tokens"
	}
	return "unspecified"
}

// Verdict is the last message of every stream that the daemon finished.
type Verdict struct {
	Status Status
	// Completion says why a StatusCompleted stream ended; CompletionUnspecified otherwise.
	Completion Completion
	// Guard names the guard that halted the stream (perplexity, logit_variance,
	// max_prob, l2_norm, non_finite, loop, internal, deadline, shutdown); empty
	// unless Status is StatusHalted.
	Guard      string
	Value      *float64 // the guard's measured value, nil if none
	Threshold  *float64 // the policy threshold it crossed
	TokenIndex *uint32  // index of the withheld token that tripped it
	Tokens     uint32   // tokens released
	Text       string   // the released text
	Policy     string
	// PolicySHA256 is the sha256 of the policy's canonical form.
	PolicySHA256 string
	Message      string // detail for StatusError
}

// Info describes what the daemon serves. It marshals to JSON with the proto's field
// names, less the model's path (the daemon machine's business): `guarded-generate --info`.
type Info struct {
	Version  string       `json:"version"` // libfse version
	Model    ModelInfo    `json:"model"`
	Policies []PolicyInfo `json:"policies"`
	Limits   Limits       `json:"limits"`
}

// ModelInfo describes the served model.
type ModelInfo struct {
	Name             string `json:"name"`
	Path             string `json:"-"`
	SHA256           string `json:"sha256"`      // of the GGUF file
	Description      string `json:"description"` // architecture, size, quantization
	VocabSize        uint32 `json:"vocab_size"`
	ContextSize      uint32 `json:"context_size"` // tokens per stream, prompt and generated
	TrainContextSize uint32 `json:"train_context_size"`
	SizeBytes        uint64 `json:"size_bytes"`    // of the GGUF file
	ChatTemplate     bool   `json:"chat_template"` // whether Request.Messages are accepted
	// Backend is where the offloaded layers run: ggml's name of the first GPU holding
	// layers less its index (CUDA, Vulkan, Metal ...), or CPU when none is on a GPU.
	Backend   string   `json:"backend"`
	Layers    uint32   `json:"layers"`     // the model's repeating layers
	GPULayers uint32   `json:"gpu_layers"` // of them, offloaded to GPUs
	Devices   []Device `json:"devices"`    // every device of the daemon's llama.cpp, in ggml's order
}

// Device is a device the daemon's llama.cpp can compute on, with the model layers on it.
type Device struct {
	Name        string `json:"name"` // ggml's name: CPU, CUDA0, Vulkan0 ...
	Description string `json:"description"`
	Kind        string `json:"kind"`         // cpu, gpu, igpu, accel or other
	MemoryBytes uint64 `json:"memory_bytes"` // total memory
	Layers      uint32 `json:"layers"`       // of ModelInfo.Layers, placed on this device
}

// PolicyInfo is a policy a request may name.
type PolicyInfo struct {
	Name    string `json:"name"`
	SHA256  string `json:"sha256"`
	Builtin bool   `json:"builtin"`
}

// Limits are the daemon's admission limits.
type Limits struct {
	MaxStreams      uint32 `json:"max_streams"`       // streams decoded together
	MaxQueue        uint32 `json:"max_queue"`         // streams waiting for a slot before ResourceExhausted
	MaxTokens       uint32 `json:"max_tokens"`        // upper bound of Request.MaxTokens
	MaxPromptTokens uint32 `json:"max_prompt_tokens"` // prompt tokens per stream
	MaxMessageBytes uint32 `json:"max_message_bytes"` // largest client message accepted
}
