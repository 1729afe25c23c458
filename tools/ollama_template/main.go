// Renders Ollama Modelfile TEMPLATEs the way Ollama executes them, for tests/ollama.rs: Go's
// text/template with missingkey=zero, and the values Ollama passes a template that uses
// .Messages — the messages collated (consecutive messages of one role joined by a blank line),
// .System (every system message joined by a blank line), empty .Tools and .Response.
//
// Input on stdin: a JSON list of {"template": "...", "messages": [{"role": ..., "content": ...}]}.
// Output on stdout: a JSON list of {"text": "..."} or {"error": "..."}, one per input.
//
//	go run tools/ollama_template/main.go < cases.json
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Case struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
}

type Result struct {
	Text  *string `json:"text,omitempty"`
	Error *string `json:"error,omitempty"`
}

// collate is what Ollama does to the messages before rendering.
func collate(msgs []Message) (string, []*Message) {
	var system []string
	var out []*Message
	for i := range msgs {
		m := msgs[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == m.Role {
			out[len(out)-1].Content += "\n\n" + m.Content
		} else {
			out = append(out, &m)
		}
	}
	return strings.Join(system, "\n\n"), out
}

func render(c Case) Result {
	t, err := template.New("").Option("missingkey=zero").Parse(c.Template)
	if err != nil {
		e := err.Error()
		return Result{Error: &e}
	}
	system, msgs := collate(c.Messages)
	var b strings.Builder
	err = t.Execute(&b, map[string]any{
		"System":   system,
		"Messages": msgs,
		"Tools":    nil,
		"Response": "",
		"Prompt":   "",
	})
	if err != nil {
		e := err.Error()
		return Result{Error: &e}
	}
	s := b.String()
	return Result{Text: &s}
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		os.Stderr.WriteString("bad input: " + err.Error() + "\n")
		os.Exit(2)
	}
	out := make([]Result, len(cases))
	for i, c := range cases {
		out[i] = render(c)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		os.Exit(1)
	}
}
