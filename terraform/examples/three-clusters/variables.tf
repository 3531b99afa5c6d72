variable "kubeconfig" {
  description = "The kubeconfig holding a context per cluster."
  type        = string
  default     = "~/.kube/config"
}

variable "clusters" {
  description = "The three clusters: kubeconfig context, locality, and the addresses reserved for their federation and gateway LoadBalancers (ip:port)."
  type = map(object({
    context            = string
    member_id          = number
    locality           = string
    federation_address = string
    gateway_address    = string
  }))
  default = {
    east = {
      context            = "east"
      member_id          = 1
      locality           = "us-east-1/a"
      federation_address = "203.0.113.10:15017"
      gateway_address    = "203.0.113.11:15443"
    }
    west = {
      context            = "west"
      member_id          = 2
      locality           = "us-west-2/a"
      federation_address = "198.51.100.10:15017"
      gateway_address    = "198.51.100.11:15443"
    }
    central = {
      context            = "central"
      member_id          = 3
      locality           = "us-east-1/b"
      federation_address = "192.0.2.10:15017"
      gateway_address    = "192.0.2.11:15443"
    }
  }
}

variable "control_address" {
  description = "The founding cluster's control-plane gRPC API as this machine reaches it (e.g. through kubectl port-forward svc/isthmus-control 15012)."
  type        = string
  default     = "127.0.0.1:15012"
}

variable "operator_certificate_file" {
  description = "An operator credential of the founding cluster with mesh-admin rights (isthmus credentials issue --name admin --role admin --data-dir <east's dataDir>): the certificate file."
  type        = string
  default     = "admin.pem"
}

variable "operator_key_file" {
  description = "The operator credential's private key file."
  type        = string
  default     = "admin-key.pem"
}
