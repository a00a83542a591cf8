"""virtfleet host agent: libvirt, qemu-img, seed ISOs, domain XML and build flows."""
