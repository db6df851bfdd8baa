// CoreDNS for the real node, built with only the plugins its Corefile uses.
//
// Upstream's main imports every plugin (core/plugin), cloud DNS back ends and all; this
// one imports the few the node needs, so the build compiles none of the cloud SDKs. The
// order of Directives is the order in which the plugins see a query, as upstream's
// generated list has it (core/dnsserver/zdirectives.go), reduced to these plugins.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/template"
)

func init() {
	dnsserver.Directives = []string{
		"bind",
		"ready",
		"health",
		"errors",
		"log",
		"loadbalance",
		"cache",
		"template",
		"kubernetes",
	}
}

func main() {
	coremain.Run()
}
