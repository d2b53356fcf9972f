"""Installing the appliance: layout, the systemd unit, bundles, and the lifecycle after install."""
