/*
 * probe-os entry points, descriptor tables, the AP trampoline and the
 * interrupt stubs.
 *
 * Two ways in, both ending in boot_common (64-bit, flat segments, our own
 * GDT, the boot CPU on stacks[0]):
 *   entry64    the ELF entry point, for tsvmm's loader (Linux 64-bit boot
 *              protocol): long mode, identity map of the low 4 GiB, flat
 *              GDT, interrupts off, RSI = boot_params. We keep its page
 *              tables.
 *   pvh_entry  named by the XEN_ELFNOTE_PHYS32_ENTRY note, for QEMU's
 *              -kernel: 32-bit protected mode, paging off, EBX =
 *              hvm_start_info. Builds an identity map of the low 4 GiB
 *              (2 MiB pages) and switches to long mode.
 */
#include "probe.h"

	.section .text.entry, "ax"
	.code64
	.globl entry64
entry64:
	cli
	cld
	movq	%rsi, %r12			/* boot_params */
	lgdt	gdt_desc(%rip)
	leaq	stacks+STACK_SIZE(%rip), %rsp
	pushq	$SEL_CODE64
	leaq	1f(%rip), %rax
	pushq	%rax
	lretq
1:	movl	$SEL_DATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	movl	$BOOT_LINUX64, %edi
	movq	%r12, %rsi
	jmp	boot_common

	.code32
	.globl pvh_entry
pvh_entry:
	cli
	cld
	movl	%ebx, %esi			/* hvm_start_info, kept in esi */
	lgdt	gdt_desc
	ljmp	$SEL_CODE32, $1f
1:	movl	$SEL_DATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	movl	$stacks+STACK_SIZE, %esp

	/* pgtables: PML4, PDPT, then four page directories of 2 MiB pages */
	movl	$pgtables, %edi
	xorl	%eax, %eax
	movl	$(6 * 4096 / 4), %ecx
	rep stosl
	movl	$pgtables, %edi
	leal	0x1003(%edi), %eax		/* PML4[0] -> PDPT, present, writable */
	movl	%eax, (%edi)
	leal	0x1000(%edi), %ebx		/* PDPT[0..3] -> PD0..PD3 */
	leal	0x2003(%edi), %eax
	xorl	%ecx, %ecx
2:	movl	%eax, (%ebx,%ecx,8)
	addl	$0x1000, %eax
	incl	%ecx
	cmpl	$4, %ecx
	jb	2b
	leal	0x2000(%edi), %ebx		/* 2048 entries: 4 GiB identity */
	movl	$0x83, %eax			/* present, writable, 2 MiB page */
	xorl	%ecx, %ecx
3:	movl	%eax, (%ebx,%ecx,8)
	addl	$0x200000, %eax
	incl	%ecx
	cmpl	$2048, %ecx
	jb	3b

	movl	%cr4, %eax
	orl	$0x20, %eax			/* PAE */
	movl	%eax, %cr4
	movl	%edi, %cr3
	movl	$0xc0000080, %ecx		/* EFER.LME */
	rdmsr
	orl	$0x100, %eax
	wrmsr
	movl	%cr0, %eax
	andl	$0x9fffffff, %eax		/* caches on (clear CD, NW) */
	orl	$0x80000001, %eax		/* PG, PE */
	movl	%eax, %cr0
	ljmp	$SEL_CODE64, $4f
	.code64
4:	movl	$SEL_DATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	movl	$BOOT_PVH, %edi
	movl	%esi, %esi			/* zero-extend hvm_start_info */
	jmp	boot_common

boot_common:
	movq	%rdi, %r12
	movq	%rsi, %r13
	leaq	__bss_start(%rip), %rdi		/* the loader zeroes it too; a reset does not */
	leaq	__bss_end(%rip), %rcx
	subq	%rdi, %rcx
	xorl	%eax, %eax
	rep stosb
	movq	%r12, %rdi
	movq	%r13, %rsi
	call	kmain
5:	cli
	hlt
	jmp	5b

/*
 * Interrupt stubs: 16 bytes each, stub n at isr_stubs + 16 * n. Each pushes
 * an error code of 0 where the CPU pushes none, then the vector number.
 */
	.text
	.align 16
	.globl isr_stubs
isr_stubs:
	.set vec, 0
	.rept 256
	.align 16
	.if vec == 8 || (vec >= 10 && vec <= 14) || vec == 17 || vec == 21 || vec == 29 || vec == 30
	.else
	pushq	$0
	.endif
	pushq	$vec
	jmp	isr_common
	.set vec, vec + 1
	.endr

isr_common:
	pushq	%rax
	pushq	%rbx
	pushq	%rcx
	pushq	%rdx
	pushq	%rsi
	pushq	%rdi
	pushq	%rbp
	pushq	%r8
	pushq	%r9
	pushq	%r10
	pushq	%r11
	pushq	%r12
	pushq	%r13
	pushq	%r14
	pushq	%r15
	movq	%rsp, %rdi
	cld
	call	isr_dispatch
	popq	%r15
	popq	%r14
	popq	%r13
	popq	%r12
	popq	%r11
	popq	%r10
	popq	%r9
	popq	%r8
	popq	%rbp
	popq	%rdi
	popq	%rsi
	popq	%rdx
	popq	%rcx
	popq	%rbx
	popq	%rax
	addq	$16, %rsp			/* vector, error code */
	iretq

/*
 * The AP trampoline. Copied to TRAMP_BASE (below 1 MiB) and entered by a
 * SIPI with vector TRAMP_BASE >> 12 in real mode at CS = TRAMP_BASE >> 4,
 * IP = 0. Real mode -> 32-bit protected mode -> long mode on the boot
 * CPU's page tables (tramp_cr3, with its CR4 paging bits and EFER.NXE),
 * then ap_main(index) on stacks[index], the index found from the APIC id.
 * The boot CPU fills these words once, before the first SIPI.
 */
	.section .rodata.tramp, "a"
	.align 16
	.code16
	.globl tramp_start, tramp_end, tramp_cr3, tramp_cr4, tramp_efer
tramp_start:
	cli
	cld
	movw	%cs, %ax
	movw	%ax, %ds
	lgdtl	(tramp_gdtr - tramp_start)
	movl	%cr0, %eax
	andl	$0x9fffffff, %eax		/* an AP starts with caches off */
	orl	$1, %eax
	movl	%eax, %cr0
	ljmpl	$SEL_CODE32, $(TRAMP_BASE + tramp32 - tramp_start)
	.code32
tramp32:
	movl	$SEL_DATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%cr4, %eax
	orl	(TRAMP_BASE + tramp_cr4 - tramp_start), %eax	/* the boot CPU's paging bits */
	movl	%eax, %cr4
	movl	(TRAMP_BASE + tramp_cr3 - tramp_start), %eax
	movl	%eax, %cr3
	movl	$0xc0000080, %ecx
	rdmsr
	orl	(TRAMP_BASE + tramp_efer - tramp_start), %eax	/* LME, and NXE if the BSP has it */
	wrmsr
	movl	%cr0, %eax
	orl	$0x80000000, %eax
	movl	%eax, %cr0
	ljmp	$SEL_CODE64, $(TRAMP_BASE + tramp64 - tramp_start)
	.code64
tramp64:
	movl	$SEL_DATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	/* who am I: the local APIC id, through apic_to_cpu[] (filled by the
	 * boot CPU before any SIPI), so that an AP that starts late still
	 * takes its own index and stack */
	movl	$0x1b, %ecx			/* IA32_APIC_BASE */
	rdmsr
	shlq	$32, %rdx
	andl	$0xfffff000, %eax
	orq	%rdx, %rax
	movl	0x20(%rax), %eax		/* LAPIC ID register */
	shrl	$24, %eax
	movabsq	$apic_to_cpu, %rbx
	movzbl	(%rbx,%rax), %edi
	cmpl	$MAX_CPUS, %edi
	jae	6f
	leaq	1(%rdi), %rax
	shlq	$14, %rax			/* STACK_SIZE */
	movabsq	$stacks, %rsp
	addq	%rax, %rsp
	movabsq	$ap_main, %rax
	call	*%rax
6:	cli
	hlt
	jmp	6b
	.align 8
tramp_gdtr:
	.word	gdt_end - gdt - 1
	.long	gdt
	.align 8
tramp_cr3:
	.quad	0
tramp_cr4:
	.long	0x20
tramp_efer:
	.long	0x100
tramp_end:

/* Flat GDT: 0x08 64-bit code, 0x10 data, 0x18 32-bit code (accessed bits preset). */
	.data
	.align 16
gdt:
	.quad	0
	.quad	0x00af9b000000ffff
	.quad	0x00cf93000000ffff
	.quad	0x00cf9b000000ffff
gdt_end:
	.align 16
	.globl gdt_desc
gdt_desc:
	.word	gdt_end - gdt - 1
	.quad	gdt

/* Never zeroed by us: the PVH page tables (built before the C code) and the stacks. */
	.section .noinit, "aw", @nobits
	.align 4096
	.globl pgtables, stacks
pgtables:
	.skip	6 * 4096
stacks:
	.skip	MAX_CPUS * STACK_SIZE
	.globl selftest_bp
selftest_bp:				/* probe.entry=linux64: a boot_params and command line */
	.skip	2 * 4096

/* XEN_ELFNOTE_PHYS32_ENTRY: QEMU reads an 8-byte entry from a 64-bit ELF. */
	.section .note.Xen, "a", @note
	.align 4
	.long	4				/* namesz */
	.long	8				/* descsz */
	.long	18				/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz	"Xen"
	.align 4
	.quad	pvh_entry
	.align 4

	.section .note.GNU-stack, "", @progbits
