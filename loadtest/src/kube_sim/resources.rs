//! The resource types kube-sim serves: what discovery lists, how paths and
//! kinds map to storage, and which subresources each has.

/// One resource type of one group/version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceType {
    /// `""` for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub short_names: &'static [&'static str],
    pub namespaced: bool,
    /// Has the `/scale` subresource (autoscaling/v1 Scale).
    pub scale: bool,
    /// Has the `/status` subresource.
    pub status: bool,
    /// Where objects live: types that are two views of one object (core/v1
    /// and events.k8s.io/v1 Events) share it.
    pub storage: Storage,
}

/// The storage of a resource type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Storage {
    Namespaces,
    Pods,
    Services,
    Events,
    ServiceAccounts,
    ConfigMaps,
    Secrets,
    Deployments,
    StatefulSets,
    ReplicaSets,
    EndpointSlices,
    Leases,
    Roles,
    ClusterRoles,
    RoleBindings,
    ClusterRoleBindings,
    ModelServers,
    ModelBackends,
    CustomResourceDefinitions,
    PodDisruptionBudgets,
    ServiceMonitors,
    PrometheusRules,
    HorizontalPodAutoscalers,
    ScaledObjects,
    InferencePools,
    Gateways,
    HttpRoutes,
}

impl ResourceType {
    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The verbs discovery advertises.
    pub fn verbs(&self) -> &'static [&'static str] {
        &[
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ]
    }
}

#[allow(clippy::too_many_arguments)] // a table of constants reads best positionally
const fn rt(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    singular: &'static str,
    short_names: &'static [&'static str],
    namespaced: bool,
    storage: Storage,
) -> ResourceType {
    ResourceType {
        group,
        version,
        kind,
        plural,
        singular,
        short_names,
        namespaced,
        scale: false,
        status: false,
        storage,
    }
}

const fn with_status(mut r: ResourceType) -> ResourceType {
    r.status = true;
    r
}

const fn with_scale(mut r: ResourceType) -> ResourceType {
    r.scale = true;
    r.status = true;
    r
}

/// The group of the custom kinds.
pub const CUSTOM_GROUP: &str = "serving.example.com";

/// Every resource type served.
pub static RESOURCES: &[ResourceType] = &[
    with_status(rt(
        "",
        "v1",
        "Namespace",
        "namespaces",
        "namespace",
        &["ns"],
        false,
        Storage::Namespaces,
    )),
    with_status(rt(
        "",
        "v1",
        "Pod",
        "pods",
        "pod",
        &["po"],
        true,
        Storage::Pods,
    )),
    with_status(rt(
        "",
        "v1",
        "Service",
        "services",
        "service",
        &["svc"],
        true,
        Storage::Services,
    )),
    rt(
        "",
        "v1",
        "Event",
        "events",
        "event",
        &["ev"],
        true,
        Storage::Events,
    ),
    rt(
        "",
        "v1",
        "ServiceAccount",
        "serviceaccounts",
        "serviceaccount",
        &["sa"],
        true,
        Storage::ServiceAccounts,
    ),
    rt(
        "",
        "v1",
        "ConfigMap",
        "configmaps",
        "configmap",
        &["cm"],
        true,
        Storage::ConfigMaps,
    ),
    rt(
        "",
        "v1",
        "Secret",
        "secrets",
        "secret",
        &[],
        true,
        Storage::Secrets,
    ),
    with_scale(rt(
        "apps",
        "v1",
        "Deployment",
        "deployments",
        "deployment",
        &["deploy"],
        true,
        Storage::Deployments,
    )),
    with_scale(rt(
        "apps",
        "v1",
        "StatefulSet",
        "statefulsets",
        "statefulset",
        &["sts"],
        true,
        Storage::StatefulSets,
    )),
    with_scale(rt(
        "apps",
        "v1",
        "ReplicaSet",
        "replicasets",
        "replicaset",
        &["rs"],
        true,
        Storage::ReplicaSets,
    )),
    rt(
        "discovery.k8s.io",
        "v1",
        "EndpointSlice",
        "endpointslices",
        "endpointslice",
        &[],
        true,
        Storage::EndpointSlices,
    ),
    rt(
        "coordination.k8s.io",
        "v1",
        "Lease",
        "leases",
        "lease",
        &[],
        true,
        Storage::Leases,
    ),
    rt(
        "events.k8s.io",
        "v1",
        "Event",
        "events",
        "event",
        &["ev"],
        true,
        Storage::Events,
    ),
    rt(
        "rbac.authorization.k8s.io",
        "v1",
        "Role",
        "roles",
        "role",
        &[],
        true,
        Storage::Roles,
    ),
    rt(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRole",
        "clusterroles",
        "clusterrole",
        &[],
        false,
        Storage::ClusterRoles,
    ),
    rt(
        "rbac.authorization.k8s.io",
        "v1",
        "RoleBinding",
        "rolebindings",
        "rolebinding",
        &[],
        true,
        Storage::RoleBindings,
    ),
    rt(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        "clusterrolebinding",
        &[],
        false,
        Storage::ClusterRoleBindings,
    ),
    rt(
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        "customresourcedefinition",
        &["crd", "crds"],
        false,
        Storage::CustomResourceDefinitions,
    ),
    with_status(rt(
        "policy",
        "v1",
        "PodDisruptionBudget",
        "poddisruptionbudgets",
        "poddisruptionbudget",
        &["pdb"],
        true,
        Storage::PodDisruptionBudgets,
    )),
    // The Prometheus operator's kinds, stored so manifests that ship them
    // apply.
    rt(
        "monitoring.coreos.com",
        "v1",
        "ServiceMonitor",
        "servicemonitors",
        "servicemonitor",
        &["smon"],
        true,
        Storage::ServiceMonitors,
    ),
    rt(
        "monitoring.coreos.com",
        "v1",
        "PrometheusRule",
        "prometheusrules",
        "prometheusrule",
        &["promrule"],
        true,
        Storage::PrometheusRules,
    ),
    // Other autoscalers a workload may already have: scalecar must not
    // fight them.
    with_status(rt(
        "autoscaling",
        "v2",
        "HorizontalPodAutoscaler",
        "horizontalpodautoscalers",
        "horizontalpodautoscaler",
        &["hpa"],
        true,
        Storage::HorizontalPodAutoscalers,
    )),
    with_status(rt(
        "keda.sh",
        "v1alpha1",
        "ScaledObject",
        "scaledobjects",
        "scaledobject",
        &["so"],
        true,
        Storage::ScaledObjects,
    )),
    // The Gateway API Inference Extension's pool of model servers: a
    // selector, target ports and the endpoint picker that serves it.
    with_status(rt(
        "inference.networking.k8s.io",
        "v1",
        "InferencePool",
        "inferencepools",
        "inferencepool",
        &["infpool"],
        true,
        Storage::InferencePools,
    )),
    // The Gateway API objects that send traffic to an InferencePool
    // (stored for manifests to apply; kube-sim runs no gateway).
    with_status(rt(
        "gateway.networking.k8s.io",
        "v1",
        "Gateway",
        "gateways",
        "gateway",
        &["gtw"],
        true,
        Storage::Gateways,
    )),
    with_status(rt(
        "gateway.networking.k8s.io",
        "v1",
        "HTTPRoute",
        "httproutes",
        "httproute",
        &[],
        true,
        Storage::HttpRoutes,
    )),
    // A custom kind with the scale subresource, and one without (its
    // replicas are set by patching spec.replicas).
    with_scale(rt(
        CUSTOM_GROUP,
        "v1",
        "ModelServer",
        "modelservers",
        "modelserver",
        &["ms"],
        true,
        Storage::ModelServers,
    )),
    with_status(rt(
        CUSTOM_GROUP,
        "v1",
        "ModelBackend",
        "modelbackends",
        "modelbackend",
        &["mb"],
        true,
        Storage::ModelBackends,
    )),
];

/// The type at `group/version/plural`.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The type of `apiVersion` and `kind`.
pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|r| r.kind == kind && r.api_version() == api_version)
}

/// The canonical type of a storage (the first listed).
pub fn of_storage(storage: Storage) -> &'static ResourceType {
    RESOURCES
        .iter()
        .find(|r| r.storage == storage)
        .unwrap_or(&RESOURCES[0])
}

/// The groups, in discovery order, with their versions.
pub fn groups() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for r in RESOURCES {
        if !r.group.is_empty() && !out.contains(&r.group) {
            out.push(r.group);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_kinds_find_their_types() {
        assert_eq!(
            find("apps", "v1", "deployments").unwrap().kind,
            "Deployment"
        );
        assert_eq!(by_kind("v1", "Pod").unwrap().plural, "pods");
        assert!(find(CUSTOM_GROUP, "v1", "modelservers").unwrap().scale);
        assert!(!find(CUSTOM_GROUP, "v1", "modelbackends").unwrap().scale);
        assert_eq!(
            by_kind("events.k8s.io/v1", "Event").unwrap().storage,
            by_kind("v1", "Event").unwrap().storage
        );
        assert!(find("apps", "v1", "nothing").is_none());
        assert!(groups().contains(&"coordination.k8s.io"));
    }
}
