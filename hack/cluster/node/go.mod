// The node's own small programs: the pod sandbox's pause process and the probe the
// real-node tests run in containers. Standard library only, built static (CGO off).
module kubeml.dev/hack/cluster/node

go 1.26.0
