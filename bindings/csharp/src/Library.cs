using System;
using System.Runtime.InteropServices;

namespace Finetune
{
    /// <summary>The library as a whole: its version and NCCL unique ids for data-parallel groups
    /// spanning processes.</summary>
    public static class Library
    {
        /// <summary>The C ABI version this binding is written for; a library reporting another is
        /// refused when it is opened.</summary>
        public const uint AbiVersion = Native.AbiVersion;

        /// <summary>Bytes of an NCCL unique id (ModelOptions.NcclUniqueId).</summary>
        public const int NcclUniqueIdBytes = Native.NcclUniqueIdBytes;

        /// <summary>Where the library was opened from (opening it now if needed).</summary>
        public static string Path { get { return Native.Lib.Path; } }

        /// <summary>The library's version, such as "0.1.0".</summary>
        public static string Version { get { return Native.Utf8(Native.Lib.ft_version()); } }

        /// <summary>A fresh NCCL unique id for a data-parallel group spanning processes: make it on
        /// one rank, hand it to the others however the application likes, and pass it to every rank
        /// as ModelOptions.NcclUniqueId with WorldSize and Rank. This process hosts the group's
        /// rendezvous and must stay alive until every rank has loaded its model. Without NCCL
        /// (libnccl.so.2) it throws a FinetuneException with Status.Device that names it.</summary>
        public static byte[] NcclUniqueId()
        {
            var id = new byte[NcclUniqueIdBytes];
            Native.Check("ft_nccl_unique_id", Native.Lib.ft_nccl_unique_id(id, (UIntPtr)id.Length));
            return id;
        }
    }
}
