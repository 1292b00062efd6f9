"""Prototypes of service changes, measured by the benchmark before they are made in service/."""
