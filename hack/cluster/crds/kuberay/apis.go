//go:build tools

// Package kuberay pins the upstream API packages that generate.sh feeds to controller-gen.
package kuberay

import (
	_ "github.com/ray-project/kuberay/ray-operator/apis/ray/v1"
)
