// Compiles the precompiled header (CMakeLists.txt: torchguard_pch); nothing else.
