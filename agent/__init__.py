"""edgefleet agent: verifies, installs and serves model bundles on an edge device.

`agent.contract` is the wire contract shared with the fleet (bundle manifest, director
document, protocol messages, telemetry encoding); everything else is the device side.
"""

__version__ = "0.1.0"
