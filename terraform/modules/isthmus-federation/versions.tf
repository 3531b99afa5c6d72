terraform {
  required_version = ">= 1.0"
  required_providers {
    isthmus = {
      source = "isthmus.io/isthmus/isthmus"
    }
  }
}
