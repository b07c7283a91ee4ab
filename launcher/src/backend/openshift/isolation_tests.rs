//! Tests that the session's NetworkPolicies isolate: a small evaluator of the Kubernetes
//! NetworkPolicy rules (pod and namespace selectors, IP blocks with exceptions, ports) decides
//! each connection the way a conforming network plugin must, and the tests ask it about the
//! connections an escaping agent would try.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::manifests::{Flavor, Session};
use super::tests::session;

/// A pod as the policies see it.
#[derive(Clone)]
struct Pod {
    namespace: &'static str,
    labels: BTreeMap<String, String>,
}

/// Where a connection goes: a pod in the cluster, or an address outside it.
enum Peer<'a> {
    Pod(&'a Pod),
    External(IpAddr),
}

fn namespace_labels(namespace: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(
        "kubernetes.io/metadata.name".to_string(),
        namespace.to_string(),
    )])
}

fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    assert!(
        selector.match_expressions.is_none(),
        "the evaluator covers matchLabels only; extend it before using matchExpressions"
    );
    selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v))
}

fn in_cidr(ip: IpAddr, cidr: &str) -> bool {
    let (net, bits) = cidr.split_once('/').expect("CIDR with a prefix length");
    let net: IpAddr = net.parse().expect("CIDR address");
    let bits: u32 = bits.parse().expect("CIDR prefix length");
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

/// Whether a policy peer matches the other end, seen from a pod in `own_namespace`.
fn peer_matches(peer: &NetworkPolicyPeer, own_namespace: &str, other: &Peer) -> bool {
    if let Some(block) = &peer.ip_block {
        // ipBlock names addresses outside the cluster's pod network.
        let ip = match other {
            Peer::External(ip) => *ip,
            Peer::Pod(_) => return false,
        };
        return in_cidr(ip, &block.cidr) && !block.except.iter().flatten().any(|e| in_cidr(ip, e));
    }
    let Peer::Pod(pod) = other else {
        return false;
    };
    let namespace_ok = match &peer.namespace_selector {
        Some(selector) => selects(selector, &namespace_labels(pod.namespace)),
        None => pod.namespace == own_namespace,
    };
    let pod_ok = peer
        .pod_selector
        .as_ref()
        .is_none_or(|selector| selects(selector, &pod.labels));
    namespace_ok && pod_ok
}

fn port_matches(ports: &Option<Vec<NetworkPolicyPort>>, port: i32, protocol: &str) -> bool {
    match ports {
        None => true,
        Some(ports) if ports.is_empty() => true,
        Some(ports) => ports.iter().any(|p| {
            p.protocol.as_deref().unwrap_or("TCP") == protocol
                && match &p.port {
                    None => true,
                    Some(IntOrString::Int(n)) => *n == port,
                    Some(IntOrString::String(_)) => panic!("named ports are not used by paude"),
                }
        }),
    }
}

fn policy_types(policy: &NetworkPolicy) -> Vec<String> {
    policy
        .spec
        .as_ref()
        .and_then(|s| s.policy_types.clone())
        .expect("paude's policies name their types")
}

/// Whether `from` may open a connection to `to` on `port`/`protocol` under `policies`.
fn allowed(policies: &[NetworkPolicy], from: &Pod, to: &Peer, port: i32, protocol: &str) -> bool {
    let selecting = |pod: &Pod, kind: &str| -> Vec<&NetworkPolicy> {
        policies
            .iter()
            .filter(|p| p.metadata.namespace.as_deref() == Some(pod.namespace))
            .filter(|p| {
                let selector = p.spec.as_ref().and_then(|s| s.pod_selector.clone());
                selects(&selector.unwrap_or_default(), &pod.labels)
            })
            .filter(|p| policy_types(p).iter().any(|t| t == kind))
            .collect()
    };
    let egress = selecting(from, "Egress");
    let egress_ok = egress.is_empty()
        || egress.iter().any(|p| {
            p.spec
                .as_ref()
                .unwrap()
                .egress
                .iter()
                .flatten()
                .any(|rule| {
                    port_matches(&rule.ports, port, protocol)
                        && rule.to.as_ref().is_none_or(|peers| {
                            peers
                                .iter()
                                .any(|peer| peer_matches(peer, from.namespace, to))
                        })
                })
        });
    let ingress_ok = match to {
        Peer::External(_) => true,
        Peer::Pod(target) => {
            let ingress = selecting(target, "Ingress");
            ingress.is_empty()
                || ingress.iter().any(|p| {
                    p.spec
                        .as_ref()
                        .unwrap()
                        .ingress
                        .iter()
                        .flatten()
                        .any(|rule| {
                            port_matches(&rule.ports, port, protocol)
                                && rule.from.as_ref().is_none_or(|peers| {
                                    peers.iter().any(|peer| {
                                        peer_matches(peer, target.namespace, &Peer::Pod(from))
                                    })
                                })
                        })
                })
        }
    };
    egress_ok && ingress_ok
}

/// The pods of a session as its manifests label them.
fn session_pods(session: &Session) -> (Pod, Pod) {
    let m = session.manifests("172.30.0.10");
    let labels = |template: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>| {
        template.as_ref().unwrap().labels.clone().unwrap()
    };
    let agent = Pod {
        namespace: "team",
        labels: labels(&m.agent.spec.as_ref().unwrap().template.metadata),
    };
    let proxy = Pod {
        namespace: "team",
        labels: labels(&m.proxy.spec.as_ref().unwrap().template.metadata),
    };
    (agent, proxy)
}

struct World {
    policies: Vec<NetworkPolicy>,
    agent: Pod,
    proxy: Pod,
    other_agent: Pod,
    other_proxy: Pod,
    dns: Pod,
    bystander: Pod,
}

fn world(demo: Session) -> World {
    let mut other = session(Flavor::Kubernetes);
    other.name = "other".into();
    let (agent, proxy) = session_pods(&demo);
    let (other_agent, other_proxy) = session_pods(&other);
    let mut policies = Vec::new();
    for s in [&demo, &other] {
        let m = s.manifests("172.30.0.10");
        policies.push(m.agent_policy);
        policies.push(m.proxy_policy);
    }
    World {
        policies,
        agent,
        proxy,
        other_agent,
        other_proxy,
        dns: Pod {
            namespace: "kube-system",
            labels: BTreeMap::from([("k8s-app".to_string(), "kube-dns".to_string())]),
        },
        bystander: Pod {
            namespace: "team",
            labels: BTreeMap::from([("app".to_string(), "web".to_string())]),
        },
    }
}

fn external(ip: &str) -> Peer<'static> {
    Peer::External(ip.parse().unwrap())
}

#[test]
fn agent_egress_reaches_only_its_proxy_port() {
    for flavor in [Flavor::OpenShift, Flavor::Kubernetes] {
        let w = world(session(flavor));
        let p = &w.policies;
        assert!(allowed(p, &w.agent, &Peer::Pod(&w.proxy), 3128, "TCP"));
        assert!(
            !allowed(p, &w.agent, &Peer::Pod(&w.proxy), 9090, "TCP"),
            "admin port"
        );
        assert!(!allowed(p, &w.agent, &Peer::Pod(&w.proxy), 3128, "UDP"));
        assert!(
            !allowed(p, &w.agent, &Peer::Pod(&w.other_proxy), 3128, "TCP"),
            "another session's proxy"
        );
        assert!(!allowed(p, &w.agent, &Peer::Pod(&w.bystander), 80, "TCP"));
        assert!(!allowed(p, &w.agent, &Peer::Pod(&w.other_agent), 22, "TCP"));
        for ip in [
            "93.184.216.34",
            "169.254.169.254",
            "10.0.0.1",
            "8.8.8.8",
            "2001:4860::8888",
        ] {
            for port in [80, 443, 3128] {
                assert!(
                    !allowed(p, &w.agent, &external(ip), port, "TCP"),
                    "{ip}:{port}"
                );
            }
        }
    }
}

#[test]
fn agent_gets_no_dns_at_all() {
    let w = world(session(Flavor::OpenShift));
    for (port, protocol) in [(53, "UDP"), (53, "TCP"), (5353, "UDP"), (5353, "TCP")] {
        assert!(!allowed(
            &w.policies,
            &w.agent,
            &Peer::Pod(&w.dns),
            port,
            protocol
        ));
        assert!(!allowed(
            &w.policies,
            &w.agent,
            &external("8.8.8.8"),
            port,
            protocol
        ));
    }
}

#[test]
fn proxy_accepts_only_its_own_agent() {
    let w = world(session(Flavor::Kubernetes));
    let p = &w.policies;
    assert!(allowed(p, &w.agent, &Peer::Pod(&w.proxy), 3128, "TCP"));
    assert!(!allowed(
        p,
        &w.other_agent,
        &Peer::Pod(&w.proxy),
        3128,
        "TCP"
    ));
    assert!(!allowed(p, &w.bystander, &Peer::Pod(&w.proxy), 3128, "TCP"));
    assert!(!allowed(p, &w.dns, &Peer::Pod(&w.proxy), 3128, "TCP"));
    // Nothing may open a connection to the agent, not even its proxy.
    assert!(!allowed(p, &w.proxy, &Peer::Pod(&w.agent), 22, "TCP"));
    assert!(!allowed(p, &w.bystander, &Peer::Pod(&w.agent), 8080, "TCP"));
}

#[test]
fn proxy_reaches_dns_and_the_internet_but_not_private_networks() {
    let w = world(session(Flavor::OpenShift));
    let p = &w.policies;
    assert!(allowed(p, &w.proxy, &Peer::Pod(&w.dns), 53, "UDP"));
    assert!(allowed(p, &w.proxy, &Peer::Pod(&w.dns), 5353, "TCP"));
    assert!(allowed(p, &w.proxy, &external("93.184.216.34"), 443, "TCP"));
    assert!(allowed(
        p,
        &w.proxy,
        &external("2606:4700::1111"),
        443,
        "TCP"
    ));
    for ip in [
        "169.254.169.254",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "127.0.0.1",
        "100.64.0.1",
        "fd00::1",
        "fe80::1",
    ] {
        assert!(!allowed(p, &w.proxy, &external(ip), 443, "TCP"), "{ip}");
    }
    assert!(!allowed(p, &w.proxy, &Peer::Pod(&w.bystander), 80, "TCP"));
}

#[test]
fn proxy_allow_cidr_opens_exactly_that_network() {
    let mut demo = session(Flavor::Kubernetes);
    demo.proxy_allow_cidrs = vec!["10.20.0.0/16".into()];
    let w = world(demo);
    assert!(allowed(
        &w.policies,
        &w.proxy,
        &external("10.20.3.4"),
        443,
        "TCP"
    ));
    assert!(!allowed(
        &w.policies,
        &w.proxy,
        &external("10.21.0.1"),
        443,
        "TCP"
    ));
    assert!(!allowed(
        &w.policies,
        &w.agent,
        &external("10.20.3.4"),
        443,
        "TCP"
    ));
}

/// Guards the evaluator itself: without the session's policies everything is open, so the
/// denials above come from the policies and not from a broken evaluator.
#[test]
fn evaluator_allows_everything_without_policies() {
    let w = world(session(Flavor::Kubernetes));
    assert!(allowed(&[], &w.agent, &external("8.8.8.8"), 53, "UDP"));
    assert!(allowed(&[], &w.agent, &Peer::Pod(&w.proxy), 9090, "TCP"));
    assert!(allowed(&[], &w.bystander, &Peer::Pod(&w.agent), 22, "TCP"));
}
