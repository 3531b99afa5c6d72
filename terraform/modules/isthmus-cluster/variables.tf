variable "cluster" {
  description = "This cluster's name in the federation (a DNS label)."
  type        = string
}

variable "locality" {
  description = "region/zone of the cluster, e.g. us-east-1/a (empty: none)."
  type        = string
  default     = ""
}

variable "namespace" {
  description = "Namespace Isthmus is installed into."
  type        = string
  default     = "isthmus-system"
}

variable "chart_path" {
  description = "The Isthmus Helm chart's directory. Empty: deploy/helm/isthmus of the repository this module is in."
  type        = string
  default     = ""
}

variable "image_repository" {
  description = "The isthmus image."
  type        = string
  default     = "isthmus/isthmus"
}

variable "image_tag" {
  description = "The image tag (empty: the chart's appVersion)."
  type        = string
  default     = ""
}

variable "member_id" {
  description = "This cluster's federation member id (federation.nodeId), unique in the federation."
  type        = number
}

variable "federation_peers" {
  description = "Every federation member's peer address by member id, this one included (each cluster's isthmus-federation LoadBalancer address, ip:port)."
  type        = map(string)
}

variable "federation_trust" {
  description = "Every other member's trust domain and CA certificate (PEM) by member id (each cluster module's trust_domain and trust_bundle outputs; this cluster's own entry, if given, is ignored): members authenticate each other with mutual TLS on the federation port."
  type = map(object({
    trust_domain = string
    ca_pem       = string
  }))
}

variable "join" {
  description = "true for a cluster joining a running federation (then join it with isthmus_cluster); false for the founding member."
  type        = bool
  default     = true
}

variable "gateway_address" {
  description = "How other clusters reach this cluster's east-west gateway (ip:port of its LoadBalancer, e.g. a reserved address). Empty: read from the Service once it has one."
  type        = string
  default     = ""
}

variable "gateway_service_annotations" {
  description = "Annotations of the gateway's LoadBalancer Service (e.g. to reserve its address)."
  type        = map(string)
  default     = {}
}

variable "vip_range" {
  description = "Virtual IPs for imported services."
  type        = string
  default     = "240.240.0.0/16"
}

variable "bootstrap_token" {
  description = "The token the gateway and DNS proxy present to the control plane (empty: one is generated)."
  type        = string
  default     = ""
  sensitive   = true
}

variable "ca_cert_pem" {
  description = "An operator-supplied cluster CA certificate (PEM), e.g. an intermediate of your root. Empty: the module creates one."
  type        = string
  default     = ""
}

variable "ca_key_pem" {
  description = "The key of ca_cert_pem (PKCS#8 PEM)."
  type        = string
  default     = ""
  sensitive   = true
}

variable "extra_values" {
  description = "More chart values (YAML), applied after the module's own."
  type        = string
  default     = ""
}
