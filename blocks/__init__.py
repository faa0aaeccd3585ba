"""Prefect Blocks: AzureTarget, SshAccess, FleetSource, MaintenancePolicy."""
