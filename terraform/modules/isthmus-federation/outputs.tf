output "members" {
  description = "The joined clusters: member id and whether it votes."
  value = {
    for name, c in isthmus_cluster.member : name => {
      member_id = c.member_id
      voter     = c.voter
    }
  }
}

output "clusters" {
  description = "Every member cluster's published record (name, member_id, trust_domain, locality, gateway_address, control_address, trust_bundle)."
  value       = data.isthmus_federation.mesh.clusters
}

output "trust_bundle" {
  description = "Every member cluster's CA certificates (PEM): the mesh-wide trust bundle."
  value       = data.isthmus_federation.mesh.trust_bundle
}

output "policy_ids" {
  description = "The stored policies, Kind/namespace/name, by key."
  value       = merge({ for k, p in isthmus_policy.mesh : k => p.id }, { for k, p in isthmus_failover_policy.mesh : k => "FailoverPolicy/${p.id}" })
}
