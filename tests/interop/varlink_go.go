// A third-party Varlink client against brokerd: Debian's varlink-go, as any Go program uses it.
//
// Usage: varlink-go-client unix:/path/to/control.sock SERVICE
// It calls org.varlink.service's GetInfo and GetInterfaceDescription (which varlink-go sends with
// "parameters": null), io.brokerd.Control.Status, a Watch stream (`more`) that must carry the
// events of a Restart made on a second connection, and an unknown method and interface. Prints a
// line per check and exits 1 if any failed.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/varlink/go/varlink"
)

var failed, passed int

func check(ok bool, format string, args ...interface{}) bool {
	what := fmt.Sprintf(format, args...)
	if ok {
		passed++
		fmt.Println("ok     " + what)
	} else {
		failed++
		fmt.Println("FAILED " + what)
	}
	return ok
}

type instance struct {
	ID    string `json:"id"`
	State string `json:"state"`
}

type generation struct {
	Number    uint64     `json:"number"`
	Instances []instance `json:"instances"`
}

type service struct {
	Name        string       `json:"name"`
	Generations []generation `json:"generations"`
}

type status struct {
	Version  string    `json:"version"`
	Pid      int       `json:"pid"`
	Services []service `json:"services"`
}

type event struct {
	Event   string `json:"event"`
	Service string `json:"service"`
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: varlink-go-client unix:PATH SERVICE")
		os.Exit(2)
	}
	address, svc := os.Args[1], os.Args[2]
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	conn, err := varlink.NewConnection(ctx, address)
	if !check(err == nil, "connect to %s: %v", address, err) {
		os.Exit(1)
	}
	defer conn.Close()

	var vendor, product, version, url string
	var interfaces []string
	err = conn.GetInfo(ctx, &vendor, &product, &version, &url, &interfaces)
	check(err == nil, "GetInfo (sent with \"parameters\": null) succeeds: %v", err)
	check(vendor == "brokerd" && product == "brokerd" && version != "",
		"GetInfo names brokerd and its version: %q %q %q", vendor, product, version)
	required := []string{"org.varlink.service", "io.brokerd.Control", "io.brokerd.Worker"}
	for _, want := range required {
		found := false
		for _, i := range interfaces {
			found = found || i == want
		}
		check(found, "GetInfo lists %s: %v", want, interfaces)
	}

	for _, name := range required {
		desc, err := conn.GetInterfaceDescription(ctx, name)
		check(err == nil, "GetInterfaceDescription(%s) succeeds: %v", name, err)
		first := ""
		for _, line := range strings.Split(desc, "\n") {
			if t := strings.TrimSpace(line); t != "" && !strings.HasPrefix(t, "#") {
				first = t
				break
			}
		}
		check(first == "interface "+name, "the description of %s starts with its interface line: %q", name, first)
	}

	var st status
	err = conn.Call(ctx, "io.brokerd.Control.Status", nil, &st)
	check(err == nil, "Status (parameters null) succeeds: %v", err)
	check(st.Pid > 0, "Status has brokerd's pid: %d", st.Pid)
	ready := 0
	for _, s := range st.Services {
		if s.Name == svc {
			for _, g := range s.Generations {
				for _, i := range g.Instances {
					if i.State == "ready" {
						ready++
					}
				}
			}
		}
	}
	check(ready == 1, "Status shows service %s with its one instance ready: %d", svc, ready)

	err = conn.Call(ctx, "io.brokerd.Control.NoSuchMethod", nil, nil)
	var nomethod *varlink.MethodNotFound
	check(errors.As(err, &nomethod), "an unknown method gets MethodNotFound: %v", err)
	err = conn.Call(ctx, "org.example.nosuch.Method", nil, nil)
	var noiface *varlink.InterfaceNotFound
	check(errors.As(err, &noiface), "an unknown interface gets InterfaceNotFound: %v", err)
	err = conn.Call(ctx, "org.varlink.service.GetInfo", nil, nil)
	check(err == nil, "the connection serves on after errors: %v", err)

	// A `more` call: Watch, whose replies carry the events of a Restart made elsewhere.
	watch, err := varlink.NewConnection(ctx, address)
	if !check(err == nil, "a second connection for Watch: %v", err) {
		os.Exit(1)
	}
	defer watch.Close()
	receive, err := watch.Send(ctx, "io.brokerd.Control.Watch", map[string]string{"service": svc}, varlink.More)
	check(err == nil, "Watch is sent with more: %v", err)
	// The events come on their own goroutine, while Restarts go on the first connection (the
	// second one now carries the endless Watch).
	type received struct {
		ev  event
		err error
	}
	events := make(chan received, 256)
	go func() {
		for {
			var ev event
			flags, err := receive(ctx, &ev)
			if err == nil && flags&varlink.Continues == 0 {
				err = errors.New("a Watch reply without continues")
			}
			events <- received{ev, err}
			if err != nil {
				return
			}
		}
	}()
	// Nothing orders the Watch before a Restart made on another connection, so the first
	// Restart's events may come only in part; a second one comes after the Watch for sure.
	seen := map[string]bool{}
	for attempt := 1; attempt <= 3 && !(seen["started"] && seen["ready"]); attempt++ {
		seen = map[string]bool{}
		err = conn.Call(ctx, "io.brokerd.Control.Restart", map[string]string{"service": svc}, nil)
		check(err == nil, "Restart %d succeeds: %v", attempt, err)
		deadline := time.After(10 * time.Second)
	wait:
		for !seen["ready"] {
			select {
			case r := <-events:
				if !check(r.err == nil, "the Watch stream reads without error: %v", r.err) {
					break wait
				}
				check(r.ev.Service == svc, "Watch event %s is of service %s (%q)", r.ev.Event, svc, r.ev.Service)
				seen[r.ev.Event] = true
			case <-deadline:
				break wait
			}
		}
	}
	check(seen["started"] && seen["ready"], "Watch streams a restart's started and ready events: %v", seen)

	fmt.Printf("%d passed, %d failed\n", passed, failed)
	if failed > 0 {
		os.Exit(1)
	}
}
