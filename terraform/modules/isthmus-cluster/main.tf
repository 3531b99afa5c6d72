# One cluster's Isthmus: the Helm chart (control plane with its federation member, east-west
# gateway, DNS proxy, injection webhook), its cluster CA, and what the other clusters need
# to know about it.

resource "random_password" "bootstrap" {
  count   = var.bootstrap_token == "" ? 1 : 0
  length  = 48
  special = false
}

resource "tls_private_key" "ca" {
  count       = var.ca_cert_pem == "" ? 1 : 0
  algorithm   = "ECDSA"
  ecdsa_curve = "P256"
}

resource "tls_self_signed_cert" "ca" {
  count                 = var.ca_cert_pem == "" ? 1 : 0
  private_key_pem       = tls_private_key.ca[0].private_key_pem
  is_ca_certificate     = true
  validity_period_hours = 87600
  allowed_uses          = ["cert_signing", "crl_signing", "digital_signature"]

  subject {
    common_name  = "${var.cluster}.isthmus.local"
    organization = "Isthmus cluster ${var.cluster}"
  }
}

locals {
  # Relative paths are relative to where terraform runs, so the default is anchored here.
  chart_path = var.chart_path != "" ? var.chart_path : "${path.module}/../../../deploy/helm/isthmus"

  ca_cert_pem     = var.ca_cert_pem != "" ? var.ca_cert_pem : tls_self_signed_cert.ca[0].cert_pem
  ca_key_pem      = var.ca_key_pem != "" ? var.ca_key_pem : tls_private_key.ca[0].private_key_pem_pkcs8
  bootstrap_token = var.bootstrap_token != "" ? var.bootstrap_token : random_password.bootstrap[0].result

  trust_domain = "${var.cluster}.isthmus.local"

  # The chart's federation.peers: this member by its address, every other one with its trust
  # domain and CA certificate.
  federation_peers = merge(
    { for id, addr in var.federation_peers : id => addr if tonumber(id) == var.member_id },
    {
      for id, addr in var.federation_peers : id => {
        addr        = addr
        trustDomain = var.federation_trust[id].trust_domain
        caPem       = var.federation_trust[id].ca_pem
      } if tonumber(id) != var.member_id
    },
  )

  values = {
    cluster  = var.cluster
    locality = var.locality
    image = {
      repository = var.image_repository
      tag        = var.image_tag
    }
    federation = {
      nodeId = var.member_id
      peers  = local.federation_peers
      join   = var.join
    }
    vipRange       = var.vip_range
    gatewayAddress = var.gateway_address
    bootstrapToken = local.bootstrap_token
    ca = {
      certPem = local.ca_cert_pem
      keyPem  = local.ca_key_pem
    }
    gateway = {
      service = {
        type        = "LoadBalancer"
        annotations = var.gateway_service_annotations
      }
    }
    webhook = {
      caBundle = local.ca_cert_pem
    }
  }
}

resource "kubernetes_namespace" "isthmus" {
  metadata {
    name = var.namespace
    labels = {
      "app.kubernetes.io/part-of" = "isthmus"
    }
  }
}

resource "helm_release" "isthmus" {
  name      = "isthmus"
  namespace = kubernetes_namespace.isthmus.metadata[0].name
  chart     = local.chart_path
  wait      = true
  values    = compact([yamlencode(local.values), var.extra_values])
}

data "kubernetes_service" "gateway" {
  metadata {
    name      = "isthmus-gateway"
    namespace = helm_release.isthmus.namespace
  }
}

data "kubernetes_service" "federation" {
  metadata {
    name      = "isthmus-federation"
    namespace = helm_release.isthmus.namespace
  }
}

locals {
  gateway_ingress    = try(data.kubernetes_service.gateway.status[0].load_balancer[0].ingress[0], {})
  federation_ingress = try(data.kubernetes_service.federation.status[0].load_balancer[0].ingress[0], {})
  gateway_host       = try(coalesce(lookup(local.gateway_ingress, "ip", ""), lookup(local.gateway_ingress, "hostname", "")), "")
  federation_host    = try(coalesce(lookup(local.federation_ingress, "ip", ""), lookup(local.federation_ingress, "hostname", "")), "")
}
