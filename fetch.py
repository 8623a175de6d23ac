"""Getting the paper's teacher weights: `projkd.py fetch-teachers` and `projkd.py fetch-weights`.

    # RepDistiller's six CIFAR-100 teachers, each verified
    python projkd.py fetch-teachers
    # one copied in by hand, checked the same
    python projkd.py fetch-teachers --arch vgg13 --ckpt my_vgg13.pth
    # torchvision's ImageNet weights as a teacher checkpoint
    python projkd.py fetch-weights --arch resnet34

RepDistiller's CIFAR-100 teachers, from which every number of the paper's Table 4 was distilled:
RepDistiller's own server is gone, mdistiller hosts them as one tar, and nobody publishes checksums.
So each one is evaluated on arrival (as `projkd.py eval` does) and installed only if its top-1
matches RepDistiller's published value: a downloaded file can be another model (RepDistiller issue
#29: a resnet110 that tested at 70.27%, not 74.31%). Beside each installed <arch>.pt, <arch>.json
records where it came from; projkd.teacher_provenance reads it back for every run that uses the
teacher.

The download streams into <archive>.part and resumes with HTTP Range; <archive>.source names its
URL and is the lock that the fetches make -j starts at once share, so the archive is downloaded
once.
"""
import contextlib
import dataclasses
import io
import os
import shutil
import tarfile
import time
from dataclasses import dataclass

from models import TORCHVISION_WEIGHTS, WeightsError, torchvision_state_dict
from projkd import (
    EvalConfig,
    atomic_write,
    evaluate_checkpoint,
    file_sha256,
    option,
    options_of,
    save,
    teacher_provenance,
)

# --------------------------------------------------------------------------------------------------
# torchvision's ImageNet weights: the paper's ImageNet teachers


@dataclass
class WeightsConfig:
    arch: str = option("", "an architecture torchvision publishes ImageNet weights of: resnet18 | "
                           "resnet34 | resnet50 | densenet201")
    weights: str = option("IMAGENET1K_V1", "which of torchvision's weights (IMAGENET1K_V1: the "
                                           "paper's teachers)")
    out: str = option("", "where the plain state_dict goes; default checkpoints/imagenet/<arch>.pt")


def fetch_weights(wc):
    """`projkd.py fetch-weights`: torchvision's ImageNet weights of --arch as a plain state_dict
    file, a teacher checkpoint like any other. Its provenance is written first, then the file
    renamed into place, so a checkpoint never stands without its record."""
    if wc.arch not in TORCHVISION_WEIGHTS:
        raise WeightsError(f"fetch-weights takes --arch {' | '.join(TORCHVISION_WEIGHTS)}, "
                           f"not {wc.arch!r}")
    out = wc.out or os.path.join("checkpoints", "imagenet", f"{wc.arch}.pt")
    state = torchvision_state_dict(wc.arch, wc.weights, out)

    def write(staged):  # the record first, then atomic_write renames the file into place
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        save(state, staged)
        record = {
            "arch": wc.arch,
            "how": f"fetched from torchvision ({wc.weights}, hash-checked)",
            "sha256": file_sha256(staged),
        }
        save(record, f"{os.path.splitext(out)[0]}.json")
    atomic_write(out, write)
    print(f"torchvision's {wc.arch} {wc.weights} -> {out}")


# --------------------------------------------------------------------------------------------------
# RepDistiller's CIFAR-100 teachers, verified on arrival

TEACHERS_URL = (
    "https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar"
)
# its layout: RepDistiller's save/models/
TEACHER_MEMBER = "cifar_teachers/{arch}_vanilla/ckpt_epoch_240.pth"
# arch -> top-1 (%) on the CIFAR-100 test set, as RepDistiller publishes it (its README; the paper's
# Teacher row)
PUBLISHED_TEACHERS = {
    "wrn_40_2": 75.61, "vgg13": 74.64, "resnet32x4": 79.42, "ResNet50": 79.34,
    "resnet56": 72.34, "resnet110": 74.31,
}
# points of top-1; one test image is 0.01, so this allows 10 images of difference
TEACHER_TOLERANCE = 0.1


@dataclass
class TeachersOptions:
    arch: str = option("", "the teachers, space-separated, of wrn_40_2 vgg13 resnet32x4 ResNet50 "
                           "resnet56 resnet110; default all")
    url: str = option(TEACHERS_URL, "the archive (mdistiller's copy of RepDistiller's teachers); "
                                    "another mirror's URL or a local file works the same")
    ckpt: str = option("", "instead of the archive, a checkpoint you copied in by hand: checked "
                           "the same way (one --arch)")
    out_dir: str = option("", "where <arch>.pt and <arch>.json are installed; default "
                              "checkpoints/<dataset>")
    archive: str = option("", "where a download is kept: resumed when interrupted, reused by later "
                              "fetches; default checkpoints/<its file name>")


# The data and the device a teacher is evaluated on mean the same as for `projkd.py eval`.
EVAL_OPTIONS = tuple(f.name for f in dataclasses.fields(EvalConfig)
                     if f.name not in ("arch", "ckpt", "out"))
TeachersConfig = options_of("TeachersConfig", TeachersOptions, EVAL_OPTIONS)


def matches_published(top1, published, tolerance=TEACHER_TOLERANCE):
    # the 1e-6 absorbs float rounding: 75.51 against 75.61 is 0.1 apart, and allowed
    return abs(top1 - published) <= tolerance + 1e-6


@contextlib.contextmanager
def locked(path):
    """`path`, opened for reading and appending and held under an exclusive lock (POSIX; elsewhere
    unlocked): the fetches of several teachers that make -j starts at once download the archive
    once, one after the other."""
    with open(path, "a+") as f:
        with contextlib.suppress(ImportError):
            import fcntl  # POSIX only: here, not at the top
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another fetch-teachers, which holds {path}", flush=True)
                fcntl.flock(f, fcntl.LOCK_EX)
        yield f


def megabytes(n):
    return f"{n / 1e6:.1f} MB"


def download(url, part):
    """The file at `url` streamed into `part`, after the bytes `part` already holds when the
    server can resume (HTTP Range); otherwise from the start. Returns only once every byte
    announced has arrived."""
    import http.client
    import urllib.error
    import urllib.request

    have = 0
    if os.path.exists(part):
        have = os.path.getsize(part)
    headers = {}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=60) as response:
            resumed = have and response.status == 206
            content_range = response.headers.get("Content-Range", "")
            if resumed and not content_range.startswith(f"bytes {have}-"):
                os.remove(part)
                raise WeightsError(f"{url} answered the resumed download with other bytes; "
                                   f"{part} was removed: run the same command again "
                                   "to download it from the start")
            got = have if resumed else 0
            length = response.headers.get("Content-Length")
            total = None
            if length and length.isdigit():
                total = got + int(length)
            stream_into(response, part, resumed, got, total, url)
    except urllib.error.HTTPError as e:
        # nothing left to send after `have` bytes, or the part is not of this file
        if e.code == 416 and have:
            os.remove(part)
            return download(url, part)
        raise
    except http.client.HTTPException as e:  # e.g. a chunked transfer cut short; not an OSError
        raise OSError(f"{type(e).__name__}: {e}") from None


def stream_into(response, part, resumed, got, total, url):
    """The response's bytes appended to `part` (or written afresh), with a progress line
    every 10 s."""
    start = shown = time.time()
    first = got
    line = f"downloading {url} -> {part}"
    if resumed:
        line += f" (resuming after {megabytes(got)})"
    if total:
        line += f", {megabytes(total)}"
    print(line, flush=True)
    with open(part, "ab" if resumed else "wb") as f:
        while block := response.read(1 << 20):
            f.write(block)
            got += len(block)
            if time.time() - shown >= 10:  # every 10 s: readable in a log file too
                shown = time.time()
                so_far = f"  {megabytes(got)}"
                if total:
                    so_far = f"  {got / 1e6:.1f} of {megabytes(total)} ({100 * got // total}%)"
                print(f"{so_far}, {(got - first) / 1e6 / (shown - start):.1f} MB/s", flush=True)
    # http.client returns what came when the connection closes early
    if total is not None and got != total:
        raise OSError(f"the connection closed after {got:,} of {total:,} bytes")
    print(f"  {megabytes(got)} in {time.time() - start:.0f} s", flush=True)


def fetch_archive(url, archive):
    """(path, source) of the teachers' archive: a local file as it is, or the download of `url` kept
    at `archive` (beside it, archive.source names the URL it comes from, and is the lock make -j's
    fetches share)."""
    if "://" not in url:
        if not os.path.isfile(url):
            raise WeightsError(f"no archive at {url}: pass --url with a local copy of "
                               f"cifar_teachers.tar, or its URL ({TEACHERS_URL})")
        return url, os.path.abspath(url)
    try:
        os.makedirs(os.path.dirname(archive) or ".", exist_ok=True)
        with locked(archive + ".source") as source:
            return archive_from(url, archive, source)
    except OSError as e:
        raise WeightsError(f"cannot write {e.filename or archive} ({e.strerror or e}); "
                           "pass --archive PATH in a folder you can write") from None


def archive_from(url, archive, source):
    """fetch_archive's work under the lock on `source`, the open .source file."""
    source.seek(0)
    came_from = source.read().strip()
    part = archive + ".part"
    if os.path.isfile(archive):  # downloaded before (or put there by hand): every teacher reuses it
        if came_from and came_from != url:
            print(f"note: {archive} was downloaded from {came_from}: delete it to download {url}")
        return archive, came_from or f"{os.path.abspath(archive)}, put in place by hand"
    if came_from != url:  # no partial download, or one of another URL: start from nothing
        with contextlib.suppress(FileNotFoundError):
            os.remove(part)
        source.truncate(0)
        source.write(url)
        source.flush()
    try:
        download(url, part)
    except (OSError, ValueError) as e:
        reason = str(getattr(e, "reason", "") or e).splitlines()[0] or type(e).__name__
        message = (f"downloading {url} failed ({reason}); "
                   f"get {archive_name(url)} from there by other means and put it at {archive} "
                   "(or pass --url PATH), or train the teachers here (make TEACHERS_FROM=train)")
        kept = 0
        if os.path.exists(part):
            kept = os.path.getsize(part)
        if kept:
            message += (f"; the {megabytes(kept)} that arrived are kept in {part}: "
                        "the same command resumes")
        else:
            # nothing to resume: the .source would only name a URL that gave no bytes (removed
            # under its lock)
            with contextlib.suppress(OSError):
                os.remove(source.name)
        raise WeightsError(message) from None
    os.replace(part, archive)
    return archive, url


def archive_name(url):
    return os.path.basename(url.split("?")[0]) or "cifar_teachers.tar"


def archive_members(path, archs, downloaded):
    """{arch: member} of the tar at `path` for each of `archs`, in the layout TEACHER_MEMBER (with
    or without './')."""
    try:
        with tarfile.open(path) as tar:
            files = {m.name.removeprefix("./"): m.name for m in tar if m.isfile()}
    except (tarfile.TarError, EOFError, OSError) as e:
        if downloaded:  # our own download, damaged: a rerun fetches it again
            os.remove(path)
            fix = "it was removed: run the same command again to download it anew"
        else:
            fix = f"get cifar_teachers.tar again ({TEACHERS_URL})"
        raise WeightsError(f"{path} is not a complete tar archive ({e}); {fix}") from None
    wanted = {a: TEACHER_MEMBER.format(arch=a) for a in archs}
    missing = [member for member in wanted.values() if member not in files]
    if missing:
        raise WeightsError(f"{path} has no {', '.join(missing)}: not the archive of RepDistiller's "
                           "teachers (cifar_teachers/<arch>_vanilla/ckpt_epoch_240.pth), "
                           "or one without them")
    return {a: files[member] for a, member in wanted.items()}


def refusal(tc, arch, staged, out, facts, top1):
    """The line that refuses a teacher whose top-1 is off its published one."""
    published = PUBLISHED_TEACHERS[arch]
    where = facts["source"]
    if facts.get("member"):
        where += f" ({facts['member']})"
    if staged == out:
        outcome = "recorded as verified"
    else:
        outcome = f"installed at {out}"
    return (f"{arch} from {where} tests at top-1 {top1:.2f}% on {tc.dataset}, "
            f"but RepDistiller's {arch} has {published:.2f}%: "
            f"more than {TEACHER_TOLERANCE} points apart, so it is not {outcome}")


def install_teacher(tc, arch, staged, out, facts):
    """Evaluates the checkpoint at `staged` on the test set (as `projkd.py eval`) and, if its top-1
    matches the published one, installs it at `out` (its provenance, `facts` with the measurements,
    first in out's .json, then the file renamed into place).

    Returns None, or the line that refuses it."""
    # evaluate_checkpoint's own record, folded into ours
    scratch = f"{out}.tmp{os.getpid()}.eval.json"
    eval_options = {k: getattr(tc, k) for k in EVAL_OPTIONS}
    try:
        # its line names the scratch files; ours below says it all
        with contextlib.redirect_stdout(io.StringIO()):
            config = EvalConfig(arch=arch, ckpt=staged, out=scratch, **eval_options)
            record = evaluate_checkpoint(config)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(scratch)
    published = PUBLISHED_TEACHERS[arch]
    if not matches_published(record["top1"], published):
        return refusal(tc, arch, staged, out, facts, record["top1"])
    evaluation = {k: v for k, v in record.items() if k != "ckpt"}
    json_path = os.path.splitext(out)[0] + ".json"
    provenance = {
        "arch": arch, **facts, "checkpoint": out, "sha256": file_sha256(staged),
        "top1": record["top1"], "top5": record["top5"],
        "published_top1": published, "tolerance": TEACHER_TOLERANCE,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "evaluation": evaluation,
    }
    save(provenance, json_path)
    if staged != out:
        os.replace(staged, out)
    print(f"{arch}: top-1 {record['top1']:.2f}% top-5 {record['top5']:.2f}% "
          f"on the {record['images']} test images of {tc.dataset} "
          f"(published top-1 {published:.2f}%): verified -> {out}, provenance in {json_path}",
          flush=True)
    return None


def teachers_to_fetch(tc):
    """(the teachers of --arch still to install, the folder, {arch: its path}, whether --ckpt is the
    installed file itself) for fetch-teachers' options, which are checked here; teachers already in
    place are kept, and said so."""
    archs = tc.arch.split() or list(PUBLISHED_TEACHERS)
    unknown = [a for a in archs if a not in PUBLISHED_TEACHERS]
    if unknown:
        raise WeightsError(f"fetch-teachers takes --arch {' | '.join(PUBLISHED_TEACHERS)} "
                           f"(RepDistiller's published CIFAR-100 teachers), not {unknown[0]!r}")
    if tc.dataset == "imagenet":
        raise WeightsError("fetch-teachers installs CIFAR-100 teachers; "
                           "ImageNet's come from fetch-weights --arch ARCH")
    if tc.ckpt and len(archs) != 1:
        raise WeightsError("--ckpt checks one teacher: name its architecture, "
                           "e.g. --arch vgg13 --ckpt my_vgg13.pth")
    if tc.ckpt and not os.path.isfile(tc.ckpt):
        raise WeightsError(f"no checkpoint at {tc.ckpt}")
    out_dir = tc.out_dir or os.path.join("checkpoints", tc.dataset)
    outs = {a: os.path.join(out_dir, f"{a}.pt") for a in archs}
    first_out = outs[archs[0]]
    in_place = bool(tc.ckpt) and os.path.exists(first_out) and os.path.samefile(tc.ckpt, first_out)
    installed = [a for a in archs if os.path.exists(outs[a])]
    if in_place:
        installed = []
    for arch in installed:
        if tc.ckpt:
            raise WeightsError(f"{outs[arch]} exists already: delete it first, "
                               f"or check it where it is (--ckpt {outs[arch]})")
        how = teacher_provenance(outs[arch])["how"]
        print(f"{arch}: {outs[arch]} is in place, kept as it is ({how})")
        archs.remove(arch)
    return archs, out_dir, outs, in_place


def stage_teacher(tc, arch, archive, member, staged):
    """The checkpoint to check, written to `staged`: `member` of the tar at `archive`, or else
    --ckpt's file."""
    try:
        if member:
            print(f"{arch}: {member} of {archive}", flush=True)
            with tarfile.open(archive) as tar, tar.extractfile(member) as src:
                with open(staged, "wb") as dst:
                    # this member alone, under our name: no path from the tar
                    shutil.copyfileobj(src, dst, 1 << 20)
        else:
            shutil.copyfile(tc.ckpt, staged)
    except tarfile.TarError as e:
        raise WeightsError(f"{member} of {archive} cannot be read ({e}); "
                           "get the archive again") from None
    except OSError as e:
        raise WeightsError(f"cannot write {staged} ({e.strerror or e}); "
                           "free space or pass --out-dir elsewhere") from None


def checkpoints_to_check(tc, archs):
    """(path, source, {arch: tar member or None}): --ckpt's file, or the archive fetched from
    --url."""
    if tc.ckpt:
        return tc.ckpt, os.path.abspath(tc.ckpt), {archs[0]: None}
    archive = tc.archive or os.path.join("checkpoints", archive_name(tc.url))
    path, source = fetch_archive(tc.url, archive)
    downloaded = source == tc.url and "://" in tc.url
    return path, source, archive_members(path, archs, downloaded)


def fetch_teachers(tc):
    """`projkd.py fetch-teachers`: RepDistiller's CIFAR-100 teachers from the archive at --url (or
    one checkpoint copied in by hand, --ckpt), each checked against its published top-1 and, if it
    matches, installed as <out-dir>/<arch>.pt with its provenance in <arch>.json. A teacher already
    installed is kept as it is."""
    archs, out_dir, outs, in_place = teachers_to_fetch(tc)
    if not archs:
        return
    path, source, members = checkpoints_to_check(tc, archs)
    made = not os.path.isdir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise WeightsError(f"cannot make {out_dir} ({e.strerror}); "
                           "pass --out-dir in a folder you can write") from None
    refused = []
    for arch in archs:
        staged = outs[arch]
        if not in_place:
            staged = f"{outs[arch]}.tmp{os.getpid()}"
        how = "copied in by hand, verified"
        if members[arch]:
            how = "fetched and verified"
        try:
            if not in_place:
                stage_teacher(tc, arch, path, members[arch], staged)
            facts = {"how": how, "source": source, "member": members[arch]}
            refused.append(install_teacher(tc, arch, staged, outs[arch], facts))
        finally:
            if staged != outs[arch]:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(staged)
    refusals = [r for r in refused if r]
    if refusals:
        if made:  # leave no empty folder behind
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)
        raise WeightsError("; ".join(refusals) + " (not RepDistiller's file, or a damaged one: "
                           "fetch it again, copy it into place unchecked to use it anyway, "
                           "or train the teacher here: make TEACHERS_FROM=train)")
