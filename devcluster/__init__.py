"""A real Kubernetes control plane for tests and `make k8s-up`: built from Go modules, run on 127.0.0.1."""
