package fse_test

import (
	"context"
	"fmt"

	"libfse/clients/go/fse"
)

// The README's quick start; compiled by go test (it needs a daemon to run).
func ExampleClient_Generate() {
	ctx := context.Background()
	run := func() error {
		c, err := fse.NewClient("unix:/run/fse.sock")
		if err != nil {
			return err
		}
		defer c.Close()
		s, err := c.Generate(ctx, fse.Request{Prompt: "The capital of France is", MaxTokens: 32,
			Sampling: fse.Sampling{Temperature: new(0.0)}})
		if err != nil {
			return err
		}
		for tok := range s.Tokens() {
			fmt.Print(tok.Text)
			if tok.Health == fse.HealthRed {
				s.Cancel()
			}
		}
		v, err := s.Verdict()
		if err != nil {
			return err
		}
		fmt.Println("\n", v.Status, v.Guard)
		return nil
	}
	_ = run
}
