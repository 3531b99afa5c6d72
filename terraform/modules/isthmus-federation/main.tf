# Several clusters joined into one federation, with the mesh-wide policies that apply in
# every one of them. The isthmus provider given to this module talks to any member.

locals {
  joining = { for name, m in var.members : name => m if name != var.founder }
}

resource "isthmus_cluster" "member" {
  for_each = local.joining

  name            = each.key
  member_id       = each.value.member_id
  peer_address    = each.value.peer_address
  trust_domain    = each.value.trust_domain
  trust_bundle    = each.value.trust_bundle
  locality        = each.value.locality == "" ? null : each.value.locality
  gateway_address = each.value.gateway_address == "" ? null : each.value.gateway_address
  join_token      = lookup(var.join_tokens, each.key, null)
}

resource "isthmus_policy" "mesh" {
  for_each   = var.policies
  yaml       = each.value
  depends_on = [isthmus_cluster.member]
}

resource "isthmus_failover_policy" "mesh" {
  for_each = var.failover

  name                = each.key
  namespace           = each.value.namespace
  service             = each.value.service
  min_healthy_percent = each.value.min_healthy_percent
  hysteresis          = each.value.hysteresis

  dynamic "priority" {
    for_each = each.value.priorities
    content {
      clusters = priority.value
    }
  }

  dynamic "priority" {
    for_each = each.value.then_by_locality ? [true] : []
    content {
      by_locality = true
    }
  }

  depends_on = [isthmus_cluster.member]
}

data "isthmus_federation" "mesh" {
  depends_on = [isthmus_cluster.member]
}
