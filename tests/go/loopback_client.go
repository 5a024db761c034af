// A Go client and its own server on 127.0.0.1: Go's net/http never sends a loopback
// request to a proxy, whatever HTTP_PROXY says, so only `run --transparent` records it
// (tests/test_run_command.py). It POSTs a form to /pay, which answers 302 to /done.
package main

import (
	"fmt"
	"net"
	"net/http"
	"strings"
)

func main() {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/pay", func(w http.ResponseWriter, r *http.Request) { http.Redirect(w, r, "/done", http.StatusFound) })
	mux.HandleFunc("/done", func(w http.ResponseWriter, r *http.Request) { fmt.Fprintf(w, "%s", r.Method) })
	go http.Serve(ln, mux)
	resp, err := http.Post("http://"+ln.Addr().String()+"/pay", "application/x-www-form-urlencoded", strings.NewReader("amount=5"))
	if err != nil {
		panic(err)
	}
	fmt.Println("go", resp.StatusCode, resp.Request.Method)
}
