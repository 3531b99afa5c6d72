output "cluster" {
  description = "The cluster's name."
  value       = var.cluster
}

output "member_id" {
  description = "Its federation member id."
  value       = var.member_id
}

output "locality" {
  description = "Its locality (null when none)."
  value       = var.locality == "" ? null : var.locality
}

output "gateway_address" {
  description = "The east-west gateway's address as the other clusters reach it (ip:port)."
  value       = var.gateway_address != "" ? var.gateway_address : (local.gateway_host == "" ? null : "${local.gateway_host}:15443")
}

output "federation_address" {
  description = "The federation member's peer address (the isthmus-federation LoadBalancer, ip:port)."
  value       = local.federation_host == "" ? lookup(var.federation_peers, tostring(var.member_id), null) : "${local.federation_host}:15017"
}

output "control_service" {
  description = "The control plane's gRPC API inside the cluster (host:port)."
  value       = "isthmus-control.${helm_release.isthmus.namespace}.svc:15012"
}

output "trust_domain" {
  description = "The cluster's trust domain (<cluster>.isthmus.local)."
  value       = local.trust_domain
}

output "trust_bundle" {
  description = "The cluster CA's certificate (PEM): what the other clusters trust for this one."
  value       = local.ca_cert_pem
}

output "bootstrap_token" {
  description = "The token the cluster's gateway and DNS proxy present to its control plane."
  value       = local.bootstrap_token
  sensitive   = true
}
