// Command probe is what the real-node tests run in containers:
//
//	probe serve [-addr :8080]        HTTP server; GET / answers "<hostname> <remote addr>"
//	probe fetch [-timeout 2s] [-retry 0s] URL  GET URL; prints the body, exits 1 when it fails
//	probe alloc -mib N               allocates and touches N MiB, then sleeps (OOM tests)
//	probe sleep                      sleeps until SIGTERM
//	probe echo WORDS...              prints its arguments and exits
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: probe serve|fetch|alloc|sleep|echo ...")
		os.Exit(2)
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "serve":
		serve(args)
	case "fetch":
		os.Exit(fetch(args))
	case "alloc":
		alloc(args)
	case "sleep":
		waitForSignal()
	case "echo":
		for i, a := range args {
			if i > 0 {
				fmt.Print(" ")
			}
			fmt.Print(a)
		}
		fmt.Println()
	default:
		fmt.Fprintf(os.Stderr, "probe: unknown command %q\n", os.Args[1])
		os.Exit(2)
	}
}

func waitForSignal() {
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	<-signals
}

func serve(args []string) {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	addr := fs.String("addr", ":8080", "listen address")
	_ = fs.Parse(args)
	host, _ := os.Hostname()
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s %s\n", host, r.RemoteAddr)
	})
	server := &http.Server{Addr: *addr, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	listener, err := net.Listen("tcp", *addr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "probe serve: %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("serving on %s\n", listener.Addr())
	go func() {
		waitForSignal()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = server.Shutdown(ctx)
	}()
	if err := server.Serve(listener); err != nil && err != http.ErrServerClosed {
		fmt.Fprintf(os.Stderr, "probe serve: %v\n", err)
		os.Exit(1)
	}
}

func fetch(args []string) int {
	fs := flag.NewFlagSet("fetch", flag.ExitOnError)
	timeout := fs.Duration("timeout", 2*time.Second, "timeout of one attempt")
	retry := fs.Duration("retry", 0, "keep retrying failed attempts for this long")
	_ = fs.Parse(args)
	if fs.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: probe fetch [-timeout D] [-retry D] URL")
		return 2
	}
	client := &http.Client{Timeout: *timeout}
	deadline := time.Now().Add(*retry)
	for {
		code := fetchOnce(client, fs.Arg(0))
		if code == 0 || time.Now().After(deadline) {
			return code
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func fetchOnce(client *http.Client, url string) int {
	resp, err := client.Get(url)
	if err != nil {
		fmt.Printf("fetch failed: %v\n", err)
		return 1
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	fmt.Printf("%d %s", resp.StatusCode, body)
	if resp.StatusCode >= 400 {
		return 1
	}
	return 0
}

func alloc(args []string) {
	fs := flag.NewFlagSet("alloc", flag.ExitOnError)
	mib := fs.Int("mib", 64, "MiB to allocate and touch")
	_ = fs.Parse(args)
	blocks := make([][]byte, 0, *mib)
	for i := 0; i < *mib; i++ {
		block := make([]byte, 1<<20)
		for j := range block {
			block[j] = byte(j)
		}
		blocks = append(blocks, block)
	}
	fmt.Printf("allocated %d MiB\n", len(blocks))
	waitForSignal()
	_ = blocks
}
