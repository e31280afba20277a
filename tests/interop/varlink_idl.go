// brokerd's interface files read by Debian's varlink-go IDL parser, and held to what brokerd serves.
//
// Usage: varlink-idl-check unix:/path/to/control.sock FILE.varlink...
// Each file must parse (github.com/varlink/go/varlink/idl; with its interface name lowercased,
// the one deviation docs/design.md declares); brokerd's GetInterfaceDescription of
// its interface must be the file's text; and each of its methods, called on a connection of its
// own by a caller with no rights (run it as nobody: an operator method is refused, a worker
// method before Hello too, and nothing happens), must be answered with anything but
// MethodNotFound or MethodNotImplemented. Prints a line per check, then "methods INTERFACE
// NAME..." per file for the caller to compare with what brokerd dispatches; exits 1 if a check
// failed.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/varlink/go/varlink"
	"github.com/varlink/go/varlink/idl"
)

var failed int

var interfaceLine = regexp.MustCompile(`(?m)^interface\s+(\S+)`)

func check(ok bool, format string, args ...interface{}) bool {
	what := fmt.Sprintf(format, args...)
	if ok {
		fmt.Println("ok     " + what)
	} else {
		failed++
		fmt.Println("FAILED " + what)
	}
	return ok
}

// Calls iface.method with no parameters on a new connection; the error brokerd answered, or
// nil for a reply.
func call(ctx context.Context, address, method string) error {
	conn, err := varlink.NewConnection(ctx, address)
	if err != nil {
		return err
	}
	defer conn.Close()
	return conn.Call(ctx, method, map[string]interface{}{}, nil)
}

// Whether err is brokerd's answer (a reply or a Varlink error), not a broken connection.
func replied(err error) bool {
	var reply *varlink.Error
	var notFound *varlink.MethodNotFound
	var notImplemented *varlink.MethodNotImplemented
	var invalid *varlink.InvalidParameter
	var noInterface *varlink.InterfaceNotFound
	return err == nil || errors.As(err, &reply) || errors.As(err, &notFound) || errors.As(err, &notImplemented) ||
		errors.As(err, &invalid) || errors.As(err, &noInterface)
}

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: varlink-idl-check ADDRESS FILE.varlink...")
		os.Exit(2)
	}
	address := os.Args[1]
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	for _, path := range os.Args[2:] {
		text, err := os.ReadFile(path)
		if !check(err == nil, "%s reads: %v", path, err) {
			continue
		}
		// The one deviation docs/design.md declares: brokerd's interface names have capitals, as
		// systemd's do, where the Varlink grammar (and this parser) wants lowercase. The file is
		// parsed with its name lowercased; the strict result is printed.
		m := interfaceLine.FindStringSubmatch(string(text))
		if !check(m != nil, "%s has an interface line", path) {
			continue
		}
		name := m[1]
		lowered := interfaceLine.ReplaceAllString(string(text), "interface "+strings.ToLower(name))
		parsed, err := idl.New(lowered)
		if !check(err == nil && parsed.Name == strings.ToLower(name), "%s is valid Varlink IDL, its interface name lowercased: %v", path, err) {
			continue
		}
		_, strict := idl.New(string(text))
		fmt.Printf("note   %s as it is, to the strict grammar: %v\n", path, strict)
		conn, err := varlink.NewConnection(ctx, address)
		if !check(err == nil, "a connection to %s: %v", address, err) {
			os.Exit(1)
		}
		desc, err := conn.GetInterfaceDescription(ctx, name)
		conn.Close()
		check(err == nil && desc == string(text), "brokerd describes %s with the text of %s (%v)", name, path, err)
		if desc != string(text) {
			fmt.Printf("--- brokerd's description:\n%s\n---\n", desc)
		}

		var names []string
		for _, m := range parsed.Methods {
			names = append(names, m.Name)
			method := name + "." + m.Name
			err := call(ctx, address, method)
			var notFound *varlink.MethodNotFound
			var notImplemented *varlink.MethodNotImplemented
			check(replied(err) && !errors.As(err, &notFound) && !errors.As(err, &notImplemented),
				"brokerd dispatches %s (answered %v)", method, err)
		}
		err = call(ctx, address, name+".NoSuchMethod")
		var notFound *varlink.MethodNotFound
		check(errors.As(err, &notFound), "%s.NoSuchMethod gets MethodNotFound: %v", name, err)
		sort.Strings(names)
		fmt.Printf("methods %s %s\n", name, strings.Join(names, " "))
	}
	if failed > 0 {
		os.Exit(1)
	}
}
