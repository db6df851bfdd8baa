// Command fixups applies to a generated CRD the edits its upstream project makes after
// running controller-gen, so the installed schema matches the one upstream publishes.
//
//	go run . kserve-inferenceservice FILE
//
// Only KServe needs this: its `make manifests` edits the InferenceService CRD with yq after
// controller-gen (see its Makefile). The edits are re-expressed here in Go so the build needs
// nothing but the Go toolchain.
package main

import (
	"fmt"
	"os"

	"sigs.k8s.io/yaml"
)

type object = map[string]any

func main() {
	if len(os.Args) != 3 || os.Args[1] != "kserve-inferenceservice" {
		fmt.Fprintln(os.Stderr, "usage: fixups kserve-inferenceservice FILE")
		os.Exit(2)
	}
	if err := rewrite(os.Args[2], kserveInferenceService); err != nil {
		fmt.Fprintln(os.Stderr, "fixups:", err)
		os.Exit(1)
	}
}

func rewrite(path string, edit func(object) error) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var crd object
	if err := yaml.Unmarshal(data, &crd); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if err := edit(crd); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	out, err := yaml.Marshal(crd)
	if err != nil {
		return err
	}
	return os.WriteFile(path, append([]byte("---\n"), out...), 0o644)
}

// kserveInferenceService mirrors the yq edits of KServe's `manifests` target.
func kserveInferenceService(crd object) error {
	versions, _ := crd["spec"].(object)["versions"].([]any)
	if len(versions) == 0 {
		return fmt.Errorf("no versions")
	}
	spec := dig(versions[0], "schema", "openAPIV3Schema", "properties", "spec", "properties")
	if spec == nil {
		return fmt.Errorf("no spec schema in versions[0]")
	}
	for _, component := range spec { // predictor, explainer, transformer
		props := dig(component, "properties")
		// The container `name` (and other embedded required fields) must be optional:
		// KServe fills it in; users write `predictor.model` without one.
		for _, field := range props {
			if m, ok := field.(object); ok {
				delete(m, "required")
			}
		}
		// Dropped upstream to keep the CRD under etcd's request size limit.
		delete(props, "ephemeralContainers")
		// Knative sets probe ports itself, so port is not required on the probes.
		for _, field := range props {
			for _, probe := range []string{"readinessProbe", "livenessProbe"} {
				for _, handler := range []string{"httpGet", "tcpSocket"} {
					if m := dig(field, "properties", probe, "properties", handler); m != nil {
						delete(m, "required")
					}
				}
			}
		}
		for _, probe := range []string{"readinessProbe", "livenessProbe"} {
			if m := dig(props["containers"], "items", "properties", probe, "properties", "httpGet"); m != nil {
				delete(m, "required")
			}
		}
	}
	// Kubernetes defaults a port's protocol to TCP; with the default in the schema a
	// server-side apply of the same object is a no-op instead of a conflict.
	walk(spec, func(m object) {
		if protocol, ok := m["protocol"].(object); ok {
			protocol["default"] = "TCP"
		}
	})
	return nil
}

// dig follows keys through nested maps; nil when any step is missing.
func dig(node any, keys ...string) object {
	current, ok := node.(object)
	for _, key := range keys {
		if !ok {
			return nil
		}
		current, ok = current[key].(object)
	}
	if !ok {
		return nil
	}
	return current
}

func walk(node any, visit func(object)) {
	switch value := node.(type) {
	case object:
		visit(value)
		for _, child := range value {
			walk(child, visit)
		}
	case []any:
		for _, child := range value {
			walk(child, visit)
		}
	}
}
