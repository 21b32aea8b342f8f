package main

import (
	"bytes"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// TestFollowOneMessage keeps the README's "Follow one message" true: every
// file and function its hops name exists in the bridge's package (and every
// Go file the README names anywhere exists), and every
// payload it quotes is its golden file in testdata/, byte for byte.
func TestFollowOneMessage(t *testing.T) {
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	start := bytes.Index(readme, []byte("## Follow one message"))
	end := bytes.Index(readme[start+1:], []byte("\n## "))
	if start < 0 || end < 0 {
		t.Fatal(`README.md has no section "## Follow one message"`)
	}
	section := string(readme[start : start+1+end])

	funcs := declaredFuncs(t)
	hop := regexp.MustCompile("(?m)^\\| \\d+ \\| `([a-z_]+\\.go)` \\| `(\\w+)` \\|")
	hops := hop.FindAllStringSubmatch(section, -1)
	if len(hops) < 10 {
		t.Fatalf("found %d hops in Follow one message, want both directions' (at least 10)", len(hops))
	}
	for _, h := range hops {
		file, fn := h[1], h[2]
		if !slices.Contains(funcs[file], fn) {
			t.Errorf("Follow one message names %s in %s, which does not declare it", fn, file)
		}
	}

	// The leaves in parentheses, and the layout table's files, exist too.
	for _, m := range regexp.MustCompile("`([a-z_]+\\.go)`").FindAllStringSubmatch(string(readme), -1) {
		if _, err := os.Stat(m[1]); err != nil {
			t.Errorf("README.md names %s, which does not exist", m[1])
		}
	}

	payload := regexp.MustCompile("(?s)\\(`(testdata/[^`]+)`[^\\n]*\\n\\n```[a-z]*\\n(.*?)```")
	quoted := payload.FindAllStringSubmatch(section, -1)
	if len(quoted) < 5 {
		t.Fatalf("found %d payloads quoted from testdata/, want the five edges'", len(quoted))
	}
	for _, q := range quoted {
		want, err := os.ReadFile(q[1])
		if err != nil {
			t.Errorf("Follow one message quotes %s: %v", q[1], err)
			continue
		}
		if got := q[2]; strings.TrimRight(got, "\n") != strings.TrimRight(string(want), "\n") {
			t.Errorf("Follow one message quotes %s as\n%s\nbut the file holds\n%s", q[1], got, want)
		}
	}
}

// declaredFuncs returns the functions and methods each non-test Go file
// of the package declares, by file name.
func declaredFuncs(t *testing.T) map[string][]string {
	t.Helper()
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]string{}
	fset := token.NewFileSet()
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		af, err := parser.ParseFile(fset, f, nil, parser.SkipObjectResolution)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range af.Decls {
			if fd, ok := d.(*ast.FuncDecl); ok {
				out[f] = append(out[f], fd.Name.Name)
			}
		}
	}
	return out
}
