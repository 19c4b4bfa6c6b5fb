//go:build tools

// Package tools pins helm's main package so that `go mod tidy` keeps it in
// go.mod/go.sum. helm lives in its own module so that its dependency versions
// never change the Kubernetes build in the parent module. Never compiled.
package tools

import (
	_ "helm.sh/helm/v4/cmd/helm"
)
