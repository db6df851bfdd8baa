//go:build tools

// Package prometheus pins the upstream API packages that generate.sh feeds to controller-gen.
package prometheus

import (
	_ "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
)
