"""Running Flower as processes: certificates, provisioning, Flower project files, child processes.

The federated algorithm (the ServerApp/ClientApp code in `federation/`) never imports this package.
"""
