// kube-network-policies for the real node: the upstream controller, run from a kubeconfig.
//
// Upstream's command (cmd/main.go) only reads the in-cluster configuration, a service
// account token at a fixed path that a host process does not have. This one takes the
// node component's kubeconfig, stops on SIGTERM as well as SIGINT (the controller deletes
// its nftables table on the way out), and adds /readyz, which answers 200 once the
// controller has bound its NFQUEUE: from then on every packet that reaches the queue gets
// a verdict. The controller's own nftables table steers the first packet of each
// connection of pods a policy selects there; on a kernel without the nftables queue
// expression (CONFIG_NFT_QUEUE) that table cannot be written (the controller logs it on
// each sync) and the node steers packets to the queue with an iptables NFQUEUE rule
// instead. AdminNetworkPolicy is not enabled (its CRDs are alpha and not installed).
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
	"sigs.k8s.io/kube-network-policies/pkg/networkpolicy"
)

// tableName is the upstream default; the node's cleanup deletes a table of this name.
const tableName = "kube-network-policies"

func main() {
	os.Exit(run())
}

func run() int {
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig of the controller's identity (required)")
	nodeName := flag.String("hostname-override", "", "name of the Node whose pods this process enforces (required)")
	queueID := flag.Int("nfqueue-id", 100, "NFQUEUE number the first packets of new connections go to")
	metricsAddr := flag.String("metrics-bind-address", "127.0.0.1:9080", "address of /metrics and /readyz")
	dnsFix := flag.Bool("netfilter-bug-1766-fix", false,
		"queue DNS packets in prerouting (only kernels before 6.12 need it: netfilter bug 1766)")
	klog.InitFlags(nil)
	flag.Parse()
	if *kubeconfig == "" || *nodeName == "" {
		fmt.Fprintln(os.Stderr, "netpol: --kubeconfig and --hostname-override are required")
		return 2
	}
	if *queueID < 1 || *queueID > 65535 {
		fmt.Fprintf(os.Stderr, "netpol: --nfqueue-id %d is not in 1..65535\n", *queueID)
		return 2
	}
	if _, _, err := net.SplitHostPort(*metricsAddr); err != nil {
		fmt.Fprintf(os.Stderr, "netpol: --metrics-bind-address %q: %v\n", *metricsAddr, err)
		return 2
	}

	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()

	config, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		klog.ErrorS(err, "reading the kubeconfig", "path", *kubeconfig)
		return 1
	}
	config.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	config.ContentType = "application/vnd.kubernetes.protobuf"
	client, err := kubernetes.NewForConfig(config)
	if err != nil {
		klog.ErrorS(err, "creating the client")
		return 1
	}

	listener, err := net.Listen("tcp", *metricsAddr)
	if err != nil {
		klog.ErrorS(err, "listening", "address", *metricsAddr)
		return 1
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.Handler())
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		bound, err := queueBound(uint16(*queueID))
		if err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		if !bound {
			http.Error(w, fmt.Sprintf("nfqueue %d not bound yet", *queueID), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	server := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := server.Serve(listener); err != nil && !errors.Is(err, http.ErrServerClosed) {
			klog.ErrorS(err, "serving metrics")
		}
	}()

	factory := informers.NewSharedInformerFactory(client, 0)
	controller, err := networkpolicy.NewController(
		client,
		factory.Networking().V1().NetworkPolicies(),
		factory.Core().V1().Namespaces(),
		factory.Core().V1().Pods(),
		nil, nil, nil, nil,
		networkpolicy.Config{
			QueueID:             *queueID,
			NodeName:            *nodeName,
			NetfilterBug1766Fix: *dnsFix,
			NFTableName:         tableName,
		},
	)
	if err != nil {
		klog.ErrorS(err, "creating the network policy controller")
		return 1
	}
	done := make(chan error, 1)
	go func() { done <- controller.Run(ctx) }()
	factory.Start(ctx.Done())

	status := 0
	select {
	case err = <-done: // Run returns early only when it cannot bind its queue
		if err != nil {
			klog.ErrorS(err, "network policy controller stopped")
			status = 1
		}
	case <-ctx.Done():
		// Run deletes its table when it returns; wait for that, not for ever.
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			klog.Info("controller did not stop within 10 s")
			status = 1
		}
	}
	cancel()
	factory.Shutdown()
	shutdown, stop := context.WithTimeout(context.Background(), 2*time.Second)
	defer stop()
	_ = server.Shutdown(shutdown)
	return status
}

// queueBound reports whether a process listens on NFQUEUE ``queue``: the kernel lists
// every bound queue, its number first, in /proc/net/netfilter/nfnetlink_queue.
func queueBound(queue uint16) (bool, error) {
	file, err := os.Open("/proc/net/netfilter/nfnetlink_queue")
	if err != nil {
		return false, fmt.Errorf("nfnetlink_queue: %v", err)
	}
	defer file.Close()
	scanner := bufio.NewScanner(file)
	for scanner.Scan() {
		fields := strings.Fields(scanner.Text())
		if len(fields) > 0 && fields[0] == fmt.Sprint(queue) {
			return true, nil
		}
	}
	return false, scanner.Err()
}
