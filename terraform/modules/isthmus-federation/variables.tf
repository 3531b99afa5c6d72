variable "founder" {
  description = "The cluster whose federation member started the federation (it is not joined)."
  type        = string
}

variable "members" {
  description = "Every cluster by name: its federation member id, its federation peer address (ip:port), its trust domain and CA certificate (PEM, recorded when it joins so the members authenticate it), and the locality and gateway address it must publish (empty: not checked)."
  type = map(object({
    member_id       = number
    peer_address    = string
    trust_domain    = string
    trust_bundle    = string
    locality        = string
    gateway_address = string
  }))
}

variable "join_tokens" {
  description = "One-time join tokens by cluster name (isthmus cluster token), for clusters joined by someone else's workspace. Clusters without one get a token minted by the provider."
  type        = map(string)
  default     = {}
  sensitive   = true
}

variable "policies" {
  description = "Mesh-wide policy documents (YAML, one document each) by a name of your choice: VirtualService, DestinationRule, AuthorizationPolicy, PeerAuthentication, RequestAuthentication, RateLimitPolicy, FailoverPolicy."
  type        = map(string)
  default     = {}
}

variable "failover" {
  description = "FailoverPolicies by name: the service, its namespace, the priorities after the caller's own cluster (each a list of clusters), and the hysteresis."
  type = map(object({
    service             = string
    namespace           = string
    priorities          = list(list(string))
    then_by_locality    = bool
    min_healthy_percent = number
    hysteresis          = string
  }))
  default = {}
}
