"""A small QEMU VM with an emulated IOMMU in which the VFIO backend drives real
virtio-pci devices (QEMU's), for ``tests/test_vm_vfio.py``.

The VM is plain ``qemu-system-x86_64 -kernel/-initrd``: Debian's stock kernel image,
fetched once with ``apt-get download`` and unpacked with ``dpkg -x`` into a cache
(``$MEMBALLOON_VM_CACHE``, default ``~/.cache/memballoon/vm``), ``depmod`` run on it; an
initramfs written here (busybox-static and the few modules needed) mounts the host's root
filesystem read-only over 9p (scratch space: tmpfs on /mnt and /run, so a checkout under
/tmp stays visible) and runs one command in it, so the guest uses this very
checkout and its virtual environment. Boot: ``-machine q35,kernel-irqchip=split``,
``-device intel-iommu,intremap=on``, guest ``intel_iommu=on``; the devices under test are
``disable-legacy=on,iommu_platform=on`` so their DMA goes through the IOMMU.

KVM is tried first where ``/dev/kvm`` opens; a KVM on which QEMU fails or the stock
kernel does not come up within :data:`KVM_BOOT_TIMEOUT` (nested variants do both) is
remembered in the cache and TCG is used from then on.

``python -m memballoon.tb.vm [command ...]`` boots the VM and runs a shell command in the
guest (default: the scenario of :mod:`memballoon.tb.vm_guest`), printing the console.
"""

import argparse
import dataclasses
import hashlib
import os
import pathlib
import selectors
import shutil
import subprocess
import sys
import tempfile
import time

__all__ = ["VmUnavailable", "VmResult", "Kernel", "ensure_kernel", "run_in_vm",
           "guest_devices", "QEMU", "DISK_BYTES"]

QEMU = "qemu-system-x86_64"
BUSYBOX = "/bin/busybox"
PT_INTERP = 3
KERNEL_METAPACKAGE = "linux-image-amd64"
#: Wall seconds a KVM boot may take to reach the initramfs before TCG is used instead.
KVM_BOOT_TIMEOUT = 20
#: Wall seconds for a whole run (boot and command) under TCG.
RUN_TIMEOUT = 300
#: Modules the initramfs loads (their dependencies come along from modules.dep).
GUEST_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "vfio_pci", "vfio_iommu_type1")
#: Console markers written by the initramfs.
MARK_UP = "MB-VM-UP"
MARK_EXIT = "MB-VM-EXIT"
MARK_ERROR = "MB-VM-ERROR"

VIRTIO_UNDER_IOMMU = "disable-legacy=on,iommu_platform=on"
#: Size of the raw disk image behind the guest's virtio-blk function.
DISK_BYTES = 1 << 20


def guest_devices(disk):
    """QEMU arguments for the PCI functions the guest sees. Each device sits behind its own
    PCIe root port, as a card in a slot: an endpoint with function level reset. 01:00.0 is
    a virtio-rng (the device under test); 02:00.0 and 02:00.1 are one multifunction
    device, so one IOMMU group in which 02:00.1 stays bound to the guest's virtio-pci
    driver (a foreign member for 02:00.0); 03:00.0 is a virtio-blk on the raw image
    ``disk`` (mixed readable/writable chains, indirect tables)."""
    args = []
    for port, functions in enumerate((
            [f"virtio-rng-pci,{VIRTIO_UNDER_IOMMU}"],
            [f"virtio-rng-pci,{VIRTIO_UNDER_IOMMU},multifunction=on",
             f"virtio-rng-pci,{VIRTIO_UNDER_IOMMU}"],
            [f"virtio-blk-pci,{VIRTIO_UNDER_IOMMU},drive=disk"]), start=1):
        args += ["-device", f"pcie-root-port,id=rp{port},chassis={port},addr={port + 2:02x}.0"]
        for function, device in enumerate(functions):
            args += ["-device", f"{device},bus=rp{port},addr=00.{function}"]
    return ["-drive", f"file={disk},if=none,id=disk,format=raw", *args]


class VmUnavailable(Exception):
    """The VM cannot be built or booted on this machine (what is missing is said)."""


@dataclasses.dataclass
class Kernel:
    release: str
    vmlinuz: pathlib.Path
    modules: pathlib.Path       # lib/modules/<release>, depmod run


@dataclasses.dataclass
class VmResult:
    accel: str
    exit_code: int
    console: str
    seconds: float


def cache_dir():
    default = pathlib.Path.home() / ".cache" / "memballoon" / "vm"
    return pathlib.Path(os.environ.get("MEMBALLOON_VM_CACHE", default))


def _run(cmd, **kwargs):
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs)
    except FileNotFoundError as exc:
        raise VmUnavailable(f"{cmd[0]} not found: `make setup` installs it") from exc
    except subprocess.CalledProcessError as exc:
        raise VmUnavailable(f"{' '.join(cmd)} failed: {exc.stderr.strip()}") from exc


def kernel_package():
    """The versioned image package Debian's ``linux-image-amd64`` depends on."""
    for attempt in range(2):
        out = subprocess.run(["apt-cache", "depends", KERNEL_METAPACKAGE],
                             capture_output=True, text=True).stdout
        for line in out.splitlines():
            kind, _, name = line.strip().partition(": ")
            if kind == "Depends" and name.startswith("linux-image-"):
                return name
        if attempt == 0:
            _run(["apt-get", "update", "-qq"])      # fresh machine: no package lists yet
    raise VmUnavailable(f"apt-cache knows no {KERNEL_METAPACKAGE}")


def ensure_kernel(cache=None):
    """The cached Debian kernel, downloaded and unpacked on first use."""
    cache = pathlib.Path(cache or cache_dir())
    package = kernel_package()
    release = package.removeprefix("linux-image-")
    dest = cache / package
    if not (dest / ".complete").exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            try:
                _run(["apt-get", "download", package], cwd=tmp)
            except VmUnavailable:               # stale package lists: the file moved
                _run(["apt-get", "update", "-qq"])
                _run(["apt-get", "download", package], cwd=tmp)
            [deb] = pathlib.Path(tmp).glob("*.deb")
            root = pathlib.Path(tmp) / "root"
            _run(["dpkg", "-x", str(deb), str(root)])
            _run([shutil.which("depmod") or "/usr/sbin/depmod", "-b", str(root), release])
            shutil.rmtree(dest, ignore_errors=True)
            root.rename(dest)
        (dest / ".complete").touch()
    return Kernel(release, dest / "boot" / f"vmlinuz-{release}",
                  dest / "lib" / "modules" / release)


def _module_order(modules_dir, wanted):
    """Module files (relative paths) to insmod, dependencies first."""
    deps, by_name = {}, {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[pathlib.Path(path).name.removesuffix(".ko").replace("-", "_")] = path
    order = []

    def visit(path):
        if path not in order:
            for dep in reversed(deps[path]):
                visit(dep)
            order.append(path)

    for name in wanted:
        if name not in by_name:
            raise VmUnavailable(f"module {name} not in {modules_dir}")
        visit(by_name[name])
    return order


class _Cpio:
    """A ``newc`` cpio archive (the initramfs format), built in memory."""

    def __init__(self):
        self.data = bytearray()
        self.inode = 1

    def _entry(self, name, mode, body=b"", rdev=(0, 0)):
        name = name.encode() + b"\0"
        fields = (self.inode, mode, 0, 0, 1, 0, len(body), 0, 0, *rdev, len(name), 0)
        self.inode += 1
        self.data += b"070701" + b"".join(b"%08X" % f for f in fields) + name
        self.data += b"\0" * (-len(self.data) % 4) + body
        self.data += b"\0" * (-len(self.data) % 4)

    def directory(self, name):
        self._entry(name, 0o040755)

    def file(self, name, body, mode=0o644):
        self._entry(name, 0o100000 | mode, body)

    def char_device(self, name, major, minor):
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self):
        self._entry("TRAILER!!!", 0)
        return bytes(self.data)


def _init_script(modules, command):
    """The guest's /init: load modules, mount the host root, run ``command`` there."""
    inserts = "\n".join(f"insmod /lib/modules/{m} || echo '{MARK_ERROR} insmod {m}'"
                        for m in modules)
    return f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
{inserts}
echo {MARK_UP}
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot /newroot \\
    || echo '{MARK_ERROR} cannot mount the host root over 9p'
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mount -t tmpfs tmpfs /newroot/run
mount -t tmpfs tmpfs /newroot/mnt || echo '{MARK_ERROR} no /mnt for the guest scratch space'
cd /newroot
chroot /newroot /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/mnt TMPDIR=/mnt \\
    PYTHONDONTWRITEBYTECODE=1 /bin/sh -c {_shell_quote(command)}
echo "{MARK_EXIT} $?"
poweroff -f
""".encode()


def _shell_quote(text):
    return "'" + text.replace("'", "'\\''") + "'"


def _is_static_elf(image):
    """True when the ELF64 ``image`` has no PT_INTERP (needs no dynamic loader)."""
    phoff = int.from_bytes(image[0x20:0x28], "little")
    phentsize = int.from_bytes(image[0x36:0x38], "little")
    phnum = int.from_bytes(image[0x38:0x3A], "little")
    return image[:4] == b"\x7fELF" and all(
        int.from_bytes(image[phoff + i * phentsize:][:4], "little") != PT_INTERP
        for i in range(phnum))


def build_initramfs(kernel, command, out):
    """Write the initramfs that runs ``command`` (a shell command line) in the guest."""
    if not os.path.exists(BUSYBOX):
        raise VmUnavailable(f"{BUSYBOX} missing: `make setup` installs busybox-static")
    busybox = pathlib.Path(BUSYBOX).read_bytes()
    if not _is_static_elf(busybox):
        raise VmUnavailable(f"{BUSYBOX} is dynamically linked: install busybox-static")
    modules = _module_order(kernel.modules, GUEST_MODULES)
    cpio = _Cpio()
    for directory in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox, 0o755)
    made = set()
    for module in modules:
        parts = pathlib.PurePosixPath(module).parts
        for depth in range(1, len(parts)):
            directory = "lib/modules/" + "/".join(parts[:depth])
            if directory not in made:
                cpio.directory(directory)
                made.add(directory)
        cpio.file(f"lib/modules/{module}", (kernel.modules / module).read_bytes())
    cpio.file("init", _init_script(modules, command), 0o755)
    pathlib.Path(out).write_bytes(cpio.finish())


def qemu_command(kernel, initramfs, accel, disk):
    """The QEMU command line: q35 with an interrupt-remapping IOMMU, 9p root, devices."""
    cmd = [QEMU, "-machine", f"q35,kernel-irqchip=split,accel={accel}",
           "-cpu", "host" if accel == "kvm" else "qemu64", "-m", "1024", "-smp", "1",
           "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
           "-device", "intel-iommu,intremap=on",
           "-kernel", str(kernel.vmlinuz), "-initrd", str(initramfs),
           "-append", "console=ttyS0 intel_iommu=on panic=-1 quiet loglevel=3 "
           "no_timer_check",
           "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
           "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot"]
    return cmd + guest_devices(disk)


def _boot(cmd, up_timeout, timeout, may_fail):
    """Run QEMU; the console. When the initramfs does not come up within ``up_timeout``
    or QEMU exits before it: None if ``may_fail``, else :class:`VmUnavailable`."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    console, up = bytearray(), False
    start = time.monotonic()
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                limit = timeout if up else up_timeout
                remaining = start + limit - time.monotonic()
                if remaining <= 0:
                    if not up and may_fail:
                        return None
                    raise VmUnavailable(f"the VM did not {'finish' if up else 'come up'} "
                                        f"within {limit} s; console:\n"
                                        f"{console.decode(errors='replace')}")
                if not sel.select(remaining):
                    continue
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                console += chunk
                up = up or MARK_UP.encode() in console
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
    text = console.decode(errors="replace")
    if not up and may_fail:
        return None
    if not up:
        raise VmUnavailable(f"QEMU exited with {proc.returncode} before the guest came up:"
                            f"\n{text}")
    return text


def _kvm_usable():
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
        return True
    except OSError:
        return False


def _accel_note(cache, kernel):
    """Where the result of trying KVM is remembered (per host kernel, QEMU and guest)."""
    qemu = _run([QEMU, "--version"]).stdout.splitlines()[0]
    key = f"{os.uname().release} {qemu} {kernel.release}"
    return cache / f"kvm-hangs-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def run_in_vm(command, disk=None, cache=None, timeout=RUN_TIMEOUT):
    """Boot the VM, run ``command`` (shell, in the host root) in it; a :class:`VmResult`.
    ``disk``: the raw image of the virtio-blk function (default: a zeroed temporary one)."""
    if shutil.which(QEMU) is None:
        raise VmUnavailable(f"{QEMU} not found: `make setup` installs qemu-system-x86")
    cache = pathlib.Path(cache or cache_dir())
    kernel = ensure_kernel(cache)
    note = _accel_note(cache, kernel)
    accels = ["kvm", "tcg"] if _kvm_usable() and not note.exists() else ["tcg"]
    with tempfile.TemporaryDirectory() as tmp:
        initramfs = pathlib.Path(tmp) / "initramfs.cpio"
        build_initramfs(kernel, command, initramfs)
        if disk is None:
            disk = pathlib.Path(tmp) / "disk.img"
            disk.write_bytes(bytes(DISK_BYTES))
        for accel in accels:
            start = time.monotonic()
            up_timeout = KVM_BOOT_TIMEOUT if accel == "kvm" else timeout
            console = _boot(qemu_command(kernel, initramfs, accel, disk), up_timeout, timeout,
                            may_fail=accel == "kvm")
            if console is None:
                note.touch()        # this KVM does not run the stock kernel: use TCG
                continue
            seconds = time.monotonic() - start
            exits = [line for line in console.splitlines() if line.startswith(MARK_EXIT)]
            if not exits:
                raise VmUnavailable(f"the guest command did not finish; console:\n{console}")
            return VmResult(accel, int(exits[-1].split()[1]), console, seconds)
    raise VmUnavailable(f"no accelerator of {accels} booted the guest")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="*", help="shell command run in the guest "
                        "(default: the VFIO scenario of memballoon.tb.vm_guest)")
    args = parser.parse_args(argv)
    command = " ".join(args.command) or f"{sys.executable} -m memballoon.tb.vm_guest"
    try:
        result = run_in_vm(command)
    except VmUnavailable as exc:
        print(f"vm: {exc}", file=sys.stderr)
        return 1
    print(result.console)
    print(f"[{result.accel}, {result.seconds:.1f} s, guest exit {result.exit_code}]")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
