/*
 * tsvmm probe guest: the smallest guest that exercises kvmclock.
 *
 * The host starts every vCPU directly in 64-bit mode (identity page tables
 * and a GDT set up by tsvmm) at `probe_entry` with:
 *   rdi = this vCPU's index
 *   rsi = guest-physical address of this vCPU's 32-byte pvclock area
 *   rdx = tick interval in kvmclock nanoseconds
 *   rsp = top of this vCPU's own stack
 *
 * Each vCPU enables kvmclock on its own area (MSR_KVM_SYSTEM_TIME_NEW), then
 * loops reading its kvmclock with the version protocol and prints one line
 * per event to the UART at 0x3f8:
 *   probe cpu=<n> ready
 *   probe cpu=<n> tick ns=<kvmclock ns>
 *   probe cpu=<n> stopped ns=<ns>         (GUEST_STOPPED seen, then cleared)
 *   probe cpu=<n> backwards prev=<ns> now=<ns>
 * A whole line leaves with one `rep outsb`, under a spinlock shared by all
 * vCPUs (as Linux's console lock): KVM may emulate the string instruction
 * one byte per exit (it does with SVM), and without the lock the lines of
 * several vCPUs would interleave byte by byte. On hosts that pass the
 * whole string in one exit a line costs one exit.
 *
 * Registers kept across the loop:
 *   r12 = cpu index, r13 = pvclock area, r14 = tick interval,
 *   r15 = next tick deadline (ns), rbx = previous clock reading (ns),
 *   rbp = the line buffer, 128 bytes on this vCPU's own stack.
 */
        .intel_syntax noprefix
        .code64
        .text
        .globl probe_entry
probe_entry:
        mov     r12, rdi
        mov     r13, rsi
        mov     r14, rdx
        sub     rsp, 128
        mov     rbp, rsp                /* line buffer: [rbp, rbp+128) */

        /* enable kvmclock: MSR 0x4b564d01 = area | 1 */
        mov     ecx, 0x4b564d01
        mov     rax, r13
        or      rax, 1
        mov     rdx, r13
        shr     rdx, 32
        wrmsr

        call    read_kvmclock
        mov     rbx, rax
        mov     r15, rax

        lea     rsi, [rip + msg_ready]
        call    line_begin
        call    line_end

main_loop:
        call    read_kvmclock           /* rax = ns, cl = flags */
        cmp     rax, rbx
        jb      went_backwards
        mov     rbx, rax
check_stopped:
        test    cl, 2                   /* PVCLOCK_GUEST_STOPPED */
        jz      check_tick
        and     byte ptr [r13 + 29], 0xfd   /* clear it, as Linux does */
        lea     rsi, [rip + msg_stopped]
        call    line_begin
        mov     rax, rbx
        call    put_u64
        call    line_end
check_tick:
        cmp     rbx, r15
        jb      main_loop
        add     r15, r14
        cmp     r15, rbx                /* after a long gap, do not burst */
        ja      1f
        mov     r15, rbx
        add     r15, r14
1:      lea     rsi, [rip + msg_tick]
        call    line_begin
        mov     rax, rbx
        call    put_u64
        call    line_end
        jmp     main_loop

went_backwards:
        push    rax
        push    rcx
        lea     rsi, [rip + msg_back_prev]
        call    line_begin
        mov     rax, rbx
        call    put_u64
        lea     rsi, [rip + msg_back_now]
        call    put_str
        mov     rax, [rsp + 8]
        call    put_u64
        call    line_end
        pop     rcx
        pop     rax
        mov     rbx, rax
        jmp     check_stopped

/*
 * read_kvmclock: rax = kvmclock ns, cl = pvclock flags.
 * ns = system_time + ((tsc - tsc_timestamp) shifted by tsc_shift) * mul >> 32,
 * retried while the version is odd or changed under us.
 * Clobbers rdx, rsi, rdi, r8, r9.
 */
read_kvmclock:
        mov     r8d, dword ptr [r13]    /* version */
        test    r8d, 1
        jnz     read_kvmclock
        lfence
        rdtsc
        shl     rdx, 32
        or      rax, rdx
        sub     rax, qword ptr [r13 + 8]        /* - tsc_timestamp */
        movsx   ecx, byte ptr [r13 + 28]        /* tsc_shift */
        test    ecx, ecx
        js      2f
        shl     rax, cl
        jmp     3f
2:      neg     ecx
        shr     rax, cl
3:      mov     r9d, dword ptr [r13 + 24]       /* tsc_to_system_mul */
        mul     r9
        shrd    rax, rdx, 32
        add     rax, qword ptr [r13 + 16]       /* + system_time */
        movzx   ecx, byte ptr [r13 + 29]        /* flags */
        lfence
        cmp     r8d, dword ptr [r13]
        jne     read_kvmclock
        ret

/* line_begin: rdi = buffer start, then "probe cpu=<n>" and the string at rsi. */
line_begin:
        mov     rdi, rbp
        push    rsi
        lea     rsi, [rip + msg_prefix]
        call    put_str
        mov     rax, r12
        call    put_u64
        pop     rsi
        /* fall through */
/* put_str: copy the NUL-terminated string at rsi to rdi. */
put_str:
        mov     al, byte ptr [rsi]
        test    al, al
        jz      4f
        mov     byte ptr [rdi], al
        inc     rsi
        inc     rdi
        jmp     put_str
4:      ret

/* put_u64: write rax in decimal at rdi. Clobbers rax, rcx, rdx, r8. */
put_u64:
        mov     r8, rdi
        mov     ecx, 10
        sub     rsp, 24
        lea     rdi, [rsp + 23]
5:      xor     edx, edx
        div     rcx
        add     dl, '0'
        mov     byte ptr [rdi], dl
        dec     rdi
        test    rax, rax
        jnz     5b
        inc     rdi                      /* rdi = first digit */
        lea     rcx, [rsp + 24]
        sub     rcx, rdi                 /* rcx = digit count */
        mov     rsi, rdi
        mov     rdi, r8
6:      mov     al, byte ptr [rsi]
        mov     byte ptr [rdi], al
        inc     rsi
        inc     rdi
        dec     rcx
        jnz     6b
        add     rsp, 24
        ret

/*
 * line_end: append '\n' and send the line at [rbp, rdi) with one rep outsb,
 * holding console_lock so that no other vCPU's bytes come in between, until
 * the UART says it has sent them.
 */
line_end:
        mov     byte ptr [rdi], 10
        inc     rdi
7:      mov     eax, 1
        xchg    eax, dword ptr [rip + console_lock]
        test    eax, eax
        jz      9f
8:      pause
        cmp     dword ptr [rip + console_lock], 0
        jne     8b
        jmp     7b
9:      mov     rsi, rbp
        mov     rcx, rdi
        sub     rcx, rsi
        mov     dx, 0x3f8
        cld
        rep outsb
        /* Wait for the transmitter to drain (LSR.TEMT) before letting go of
         * the console. Where the VMM queues THR writes without an exit
         * (coalesced I/O), this read also hands it the line at once. */
        add     dx, 5
10:     in      al, dx
        test    al, 0x40
        jz      10b
        mov     dword ptr [rip + console_lock], 0
        ret

        .balign 4
console_lock:   .long 0

msg_prefix:     .asciz "probe cpu="
msg_ready:      .asciz " ready"
msg_tick:       .asciz " tick ns="
msg_stopped:    .asciz " stopped ns="
msg_back_prev:  .asciz " backwards prev="
msg_back_now:   .asciz " now="
