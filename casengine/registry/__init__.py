"""The registry model: repositories, manifests, tags, referrers, usage and quotas."""

from casengine.registry.manifests import Manifest, parse_manifest
from casengine.registry.model import ManifestRecord, Page, Registry
from casengine.registry.names import Reference, check_name, check_tag
from casengine.registry.usage import UsageReport, usage

__all__ = ["Manifest", "ManifestRecord", "Page", "Reference", "Registry", "UsageReport",
           "check_name", "check_tag", "parse_manifest", "usage"]
