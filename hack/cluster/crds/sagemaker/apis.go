//go:build tools

// Package sagemaker pins the upstream API packages that generate.sh feeds to controller-gen.
package sagemaker

import (
	_ "github.com/aws-controllers-k8s/sagemaker-controller/apis/v1alpha1"
)
