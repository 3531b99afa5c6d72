output "gateways" {
  description = "Each cluster's east-west gateway address."
  value = {
    east    = module.east.gateway_address
    west    = module.west.gateway_address
    central = module.central.gateway_address
  }
}

output "trust_bundle" {
  description = "The mesh-wide trust bundle, as the federation publishes it."
  value       = module.federation.trust_bundle
}

output "members" {
  description = "The joined clusters."
  value       = module.federation.members
}

output "policies" {
  description = "The mesh-wide policies."
  value       = module.federation.policy_ids
}
