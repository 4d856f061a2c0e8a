"""Animation frames: the FrameSet array contract (`frameset`), reading frame folders and EXR files and writing the
preview (`io`). numpy at the core; no bpy, no torch in `frameset`."""
