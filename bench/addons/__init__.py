"""The addons the benchmark's addon modes run (`tproxy run --addon FILE`), one file each."""
