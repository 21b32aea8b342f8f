// Command empty is an empty handler for the load generator's tests: it
// answers every push "success" and does nothing else, as cmd/loadref's
// LOADREF_EMPTY=1 does.
package main

import (
	"io"
	"net/http"
	"os"
)

func main() {
	http.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {})
	http.HandleFunc("/wechat", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "success") })
	http.ListenAndServe(os.Getenv("LISTEN_ADDR"), nil)
	os.Exit(1)
}
