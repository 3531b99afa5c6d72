# Three clusters, each installed with the isthmus-cluster module, joined into one federation
# (east founds it) with Bookinfo's reviews routing and a failover policy for details.

locals {
  peers = { for name, c in var.clusters : tostring(c.member_id) => c.federation_address }
  # Each member's trust domain and CA, which the others' federation ports authenticate it by.
  # Only these outputs are named (not whole modules): each module's chart takes this map, and
  # a whole module would include its gateway and federation addresses, which come from that
  # chart's services (a cycle).
  trust = {
    for m in [
      { id = module.east.member_id, td = module.east.trust_domain, ca = module.east.trust_bundle },
      { id = module.west.member_id, td = module.west.trust_domain, ca = module.west.trust_bundle },
      { id = module.central.member_id, td = module.central.trust_domain, ca = module.central.trust_bundle },
      ] : tostring(m.id) => {
      trust_domain = m.td
      ca_pem       = m.ca
    }
  }
}

provider "kubernetes" {
  alias          = "east"
  config_path    = var.kubeconfig
  config_context = var.clusters["east"].context
}

provider "helm" {
  alias = "east"
  kubernetes {
    config_path    = var.kubeconfig
    config_context = var.clusters["east"].context
  }
}

provider "kubernetes" {
  alias          = "west"
  config_path    = var.kubeconfig
  config_context = var.clusters["west"].context
}

provider "helm" {
  alias = "west"
  kubernetes {
    config_path    = var.kubeconfig
    config_context = var.clusters["west"].context
  }
}

provider "kubernetes" {
  alias          = "central"
  config_path    = var.kubeconfig
  config_context = var.clusters["central"].context
}

provider "helm" {
  alias = "central"
  kubernetes {
    config_path    = var.kubeconfig
    config_context = var.clusters["central"].context
  }
}

module "east" {
  source = "../../modules/isthmus-cluster"
  providers = {
    helm       = helm.east
    kubernetes = kubernetes.east
  }

  cluster          = "east"
  locality         = var.clusters["east"].locality
  member_id        = var.clusters["east"].member_id
  federation_peers = local.peers
  federation_trust = local.trust
  join             = false
  gateway_address  = var.clusters["east"].gateway_address
}

module "west" {
  source = "../../modules/isthmus-cluster"
  providers = {
    helm       = helm.west
    kubernetes = kubernetes.west
  }

  cluster          = "west"
  locality         = var.clusters["west"].locality
  member_id        = var.clusters["west"].member_id
  federation_peers = local.peers
  federation_trust = local.trust
  join             = true
  gateway_address  = var.clusters["west"].gateway_address
}

module "central" {
  source = "../../modules/isthmus-cluster"
  providers = {
    helm       = helm.central
    kubernetes = kubernetes.central
  }

  cluster          = "central"
  locality         = var.clusters["central"].locality
  member_id        = var.clusters["central"].member_id
  federation_peers = local.peers
  federation_trust = local.trust
  join             = true
  gateway_address  = var.clusters["central"].gateway_address
}

# The isthmus provider talks to the founder's control plane, over TLS: the API's certificate
# chains to east's CA, and the provider presents east's mesh admin's operator credential.
provider "isthmus" {
  control            = var.control_address
  ca_certificate     = module.east.trust_bundle
  client_certificate = file(var.operator_certificate_file)
  client_key         = file(var.operator_key_file)
}

module "federation" {
  source = "../../modules/isthmus-federation"

  founder = "east"
  members = {
    for m in [module.east, module.west, module.central] : m.cluster => {
      member_id       = m.member_id
      peer_address    = m.federation_address
      trust_domain    = m.trust_domain
      trust_bundle    = m.trust_bundle
      locality        = m.locality == null ? "" : m.locality
      gateway_address = m.gateway_address == null ? "" : m.gateway_address
    }
  }

  policies = {
    reviews-subsets = file("${path.module}/policies/reviews-destination-rule.yaml")
    reviews-canary  = file("${path.module}/policies/reviews-canary.yaml")
  }

  failover = {
    details = {
      service             = "details"
      namespace           = "default"
      priorities          = [["central"], ["west"]]
      then_by_locality    = false
      min_healthy_percent = 50
      hysteresis          = "10s"
    }
  }
}
