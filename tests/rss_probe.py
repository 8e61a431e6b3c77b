"""Peak resident-set probes for tests that measure memory in a fresh subprocess (Linux)."""

PEAK_RSS = '''
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024


def peak_since_reset(run):
    """Peak RSS increment (bytes) while ``run()`` runs: VmHWM is reset to VmRSS first, so the
    import of torch does not set the peak; the result is held until the peak is read."""
    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM, the peak RSS, to the current RSS
    kept = run()
    peak = status("VmHWM:") - before
    del kept
    return peak

'''
"""Source of ``status(field)`` and ``peak_since_reset(run)``, pasted into a probe's code."""
