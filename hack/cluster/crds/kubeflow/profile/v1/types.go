// Package v1 declares the Kubeflow Profile API (kubeflow.org/v1, cluster-scoped) so that
// controller-gen can generate its CRD.
//
// Why this is a declaration here and not an upstream import: the upstream types live in the
// profile-controller module of the Kubeflow repositories, which has no published version
// (the module sits in a subdirectory without tags of its own), and the Go module proxy
// serves none of its pseudo-versions. The fields below follow the upstream v1 API field for
// field (owner, plugins, resourceQuotaSpec; status.conditions); the nested Kubernetes types
// (rbac/v1 Subject, core/v1 ResourceQuotaSpec) are the real ones, so their schemas are exact.
// Replace this package with the upstream module once a version of it is served.
//
// +kubebuilder:object:generate=false
// +groupName=kubeflow.org
package v1

import (
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

// Plugin configures a per-namespace integration (for example AWS IAM for the namespace's
// service account); its spec is free-form and interpreted by the plugin's kind.
type Plugin struct {
	metav1.TypeMeta `json:",inline"`
	// +kubebuilder:pruning:PreserveUnknownFields
	// +optional
	Spec *runtime.RawExtension `json:"spec,omitempty"`
}

// ProfileSpec is the desired state of a Profile: who owns the namespace it creates, the
// plugins to apply to it, and the ResourceQuota to set in it.
type ProfileSpec struct {
	// +optional
	Owner rbacv1.Subject `json:"owner,omitempty"`
	// +optional
	Plugins []Plugin `json:"plugins,omitempty"`
	// +optional
	ResourceQuotaSpec corev1.ResourceQuotaSpec `json:"resourceQuotaSpec,omitempty"`
}

// ProfileCondition is one observation of the profile controller.
type ProfileCondition struct {
	Type string `json:"type,omitempty"`
	// +optional
	Status string `json:"status,omitempty"`
	// +optional
	Message string `json:"message,omitempty"`
}

// ProfileStatus is the observed state of a Profile.
type ProfileStatus struct {
	// +optional
	Conditions []ProfileCondition `json:"conditions,omitempty"`
}

// Profile owns a namespace of the same name for a user or a team.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster
// +kubebuilder:storageversion
type Profile struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   ProfileSpec   `json:"spec,omitempty"`
	Status ProfileStatus `json:"status,omitempty"`
}

// ProfileList is a list of Profiles.
//
// +kubebuilder:object:root=true
type ProfileList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []Profile `json:"items"`
}
