module kubeml.dev/hack/cluster/crds/kserve

go 1.26.0

require github.com/kserve/kserve v0.20.0

// Copied from kserve's own go.mod: replace and exclude directives of a dependency are not
// inherited, and without these the API packages resolve different versions than upstream
// builds them with.
exclude google.golang.org/grpc/stats/opentelemetry v0.0.0-00010101000000-000000000000

replace (
	github.com/expr-lang/expr => github.com/expr-lang/expr v1.17.7
	github.com/lyft/protoc-gen-validate => github.com/envoyproxy/protoc-gen-validate v1.0.4
	google.golang.org/grpc => google.golang.org/grpc v1.79.3
	k8s.io/api => k8s.io/api v0.34.5
	k8s.io/apiextensions-apiserver => k8s.io/apiextensions-apiserver v0.34.3
	k8s.io/apimachinery => k8s.io/apimachinery v0.34.5
	k8s.io/apiserver => k8s.io/apiserver v0.34.3
	k8s.io/client-go => k8s.io/client-go v0.34.5
	k8s.io/code-generator => k8s.io/code-generator v0.34.3
	k8s.io/component-base => k8s.io/component-base v0.34.3
	k8s.io/component-helpers => k8s.io/component-helpers v0.34.3
	sigs.k8s.io/controller-runtime => sigs.k8s.io/controller-runtime v0.22.5
)
