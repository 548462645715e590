"""The container under runc: runc, bundles, runc options, rootfs mounts, cgroups, CRIU."""
