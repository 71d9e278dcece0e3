package finetune

/*
#cgo CFLAGS: -I${SRCDIR}/../../include
#cgo LDFLAGS: -ldl
#include <stdlib.h>
#include "loader.h"

// The Go types in this package mirror ABI 4's declarations: building against another header fails.
_Static_assert(FT_ABI_VERSION == 5, "bindings/go is written for FT_ABI_VERSION 5");
*/
import "C"

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"unsafe"
)

// ABIVersion is the version of libfinetune's C ABI this package is written for: a library
// reporting another ft_abi_version() is refused when it is loaded.
const ABIVersion = 5

// LibraryEnv names the environment variable that gives the full path of libfinetune.so.
const LibraryEnv = "FINETUNE_LIB"

const libName = "libfinetune.so"

var (
	loadOnce sync.Once
	loadErr  error
	loadPath string
)

// candidates lists where the library is looked for, in order: beside the running executable,
// beside this package's sources, then the usual system directories. FINETUNE_LIB, when set,
// replaces the whole list.
func candidates() []string {
	var dirs []string
	if exe, err := os.Executable(); err == nil {
		dirs = append(dirs, filepath.Dir(exe))
	}
	if _, file, _, ok := runtime.Caller(0); ok {
		dirs = append(dirs, filepath.Dir(file))
	}
	for _, d := range filepath.SplitList(os.Getenv("LD_LIBRARY_PATH")) {
		if d != "" {
			dirs = append(dirs, d)
		}
	}
	dirs = append(dirs, "/usr/local/lib", "/usr/lib", "/usr/lib/x86_64-linux-gnu")
	paths := make([]string, 0, len(dirs))
	for _, d := range dirs {
		paths = append(paths, filepath.Join(d, libName))
	}
	return paths
}

func open(path string) error {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var buf [1024]C.char
	if C.ftgo_open(cpath, &buf[0], C.size_t(len(buf))) != 0 {
		return fmt.Errorf("%s", C.GoString(&buf[0]))
	}
	return nil
}

func load() error {
	loadOnce.Do(func() {
		if p := os.Getenv(LibraryEnv); p != "" {
			if err := open(p); err != nil {
				loadErr = fmt.Errorf("finetune: cannot load the library named by %s=%s: %v", LibraryEnv, p, err)
				return
			}
			loadPath = p
			return
		}
		looked := []string{LibraryEnv + " (not set)"}
		for _, p := range candidates() {
			if _, err := os.Stat(p); err != nil {
				looked = append(looked, p+" (absent)")
				continue
			}
			if err := open(p); err != nil {
				looked = append(looked, fmt.Sprintf("%s (%v)", p, err))
				continue
			}
			loadPath = p
			return
		}
		// Last, the dynamic linker's own search (ld.so.cache, DT_RUNPATH of the executable).
		if err := open(libName); err == nil {
			loadPath = libName
			return
		}
		looked = append(looked, "the dynamic linker's search path")
		loadErr = fmt.Errorf("finetune: %s not found; set %s to its full path. Looked in: %s",
			libName, LibraryEnv, strings.Join(looked, ", "))
	})
	// ftgo_open refuses a library of another ABI; checked again here against the Go constant.
	if loadErr == nil && C.ftgo_abi_version() != ABIVersion {
		return fmt.Errorf("finetune: %s has C ABI version %d, this package needs %d",
			loadPath, C.ftgo_abi_version(), ABIVersion)
	}
	return loadErr
}

// Load finds and opens libfinetune.so now, returning where it came from. Every other function
// loads it on first use, so calling Load is needed only to fail early or to log the path.
func Load() (string, error) {
	if err := load(); err != nil {
		return "", err
	}
	return loadPath, nil
}

// Version is the library's version, such as "0.1.0".
func Version() (string, error) {
	if err := load(); err != nil {
		return "", err
	}
	return C.GoString(C.ftgo_version()), nil
}
