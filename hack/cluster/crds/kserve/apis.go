//go:build tools

// Package kserve pins the upstream API packages that generate.sh feeds to controller-gen.
package kserve

import (
	_ "github.com/kserve/kserve/pkg/apis/serving/v1beta1"
)
