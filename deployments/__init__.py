"""The three ways maintenance starts, as Prefect deployments of ``fleet-maintenance``."""
